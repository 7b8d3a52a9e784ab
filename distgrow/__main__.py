"""``python -m distgrow`` runs the ``distgrow`` command (so ``torchrun -m distgrow`` works).

Under torchrun a non-zero exit is also written to ``TORCHELASTIC_ERROR_FILE``
(:mod:`distgrow.launch.error_file`): torch records only exceptions, and torchrun passes the
first failed worker's file (with its status) to the controller.
"""

import os
import sys

from distgrow.cli import main

if os.environ.get("TORCHELASTIC_ERROR_FILE"):
    from distgrow.launch.error_file import recorded

    sys.exit(recorded(main)())
sys.exit(main())
