"""``python -m distgrow`` runs the ``distgrow`` command (so ``torchrun -m distgrow`` works)."""

import sys

from distgrow.cli import main

sys.exit(main())
