"""`python -m normserve.bench`: the same as `normserve bench`."""

import sys

from normserve.bench.cli import main

sys.exit(main())
