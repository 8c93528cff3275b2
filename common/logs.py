"""Keep Flower's log readable: Opacus calls logging.basicConfig() on import, which makes every flwr record
(DEBUG included) print twice through the root logger."""

from __future__ import annotations

import logging
import os
import warnings


def tidy_logging() -> None:
    logging.getLogger("flwr").propagate = False
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Opacus's PRV accountant bounds its domain with RDP and warns about the RDP order range; the epsilon we
    # report is the PRV one, so the warning is noise here.
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
