"""``python -m difforge ...`` (and ``torchrun --nproc-per-node N -m difforge train ...``): the CLI."""

import sys

from difforge.cli import main

sys.exit(main())
