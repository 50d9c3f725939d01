"""`python -m difforge_bench`: the same as the `difforge-bench` console script."""

import sys

from difforge_bench.cli import main

sys.exit(main())
