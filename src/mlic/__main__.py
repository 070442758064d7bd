"""``python -m mlic`` (what ``torchrun -m mlic train ...`` runs)."""

import sys

from mlic.cli import main

sys.exit(main())
