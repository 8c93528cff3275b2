"""Privacy accounting for a site: calibration, the run-long accountant, the budget, an independent check.

Unit: one image (record-level DP) at each site. Accountant: Opacus PRV, composed over every DP-SGD step of every
round. Independent check: Google's dp-accounting PLD accountant over the same (noise, sampling rate, steps).
"""

from common.privacy.accountant import SitePrivacy, calibrate_noise_multiplier
from common.privacy.independent import patient_level_epsilon, pld_epsilon, rdp_epsilon

__all__ = ["SitePrivacy", "calibrate_noise_multiplier", "patient_level_epsilon", "pld_epsilon", "rdp_epsilon"]
