"""Privacy accounting for a site: calibration, the run-long accountant, the budget, an independent check.

Unit: one image (record-level DP) at each site. Accountant: Opacus PRV, composed over every DP-SGD step of every
round. Independent check: Google's dp-accounting PLD accountant over the same (noise, sampling rate, steps).

The names below load on first use (PEP 562): the ledger and the site's gate import this package, and a deployed
SuperNode starts a fresh ClientApp process for every message, most of which (the key stages) need no Opacus.
"""

from importlib import import_module

_WHERE = {"SitePrivacy": "accountant", "calibrate_noise_multiplier": "accountant",
          "patient_level_epsilon": "independent", "pld_epsilon": "independent", "rdp_epsilon": "independent"}
__all__ = list(_WHERE)


def __getattr__(name: str) -> object:
    if name in _WHERE:
        return getattr(import_module(f"common.privacy.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'common.privacy' has no attribute {name!r}")
