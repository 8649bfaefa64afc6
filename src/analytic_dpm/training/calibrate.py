"""``python -m analytic_dpm.training.calibrate``: the older name of ``python -m analytic_dpm.calibrate`` (same flags).

Calibrating Gamma is not training; the command lives in :mod:`analytic_dpm.calibrate`. This name stays so that the
commands in notes and scripts written before keep working.
"""

import sys

from ..calibrate import build_parser, calibrate_pretrained, main

__all__ = ["build_parser", "calibrate_pretrained", "main"]

if __name__ == "__main__":
    sys.exit(main())
