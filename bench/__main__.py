"""`python -m bench`: the same as `normserve bench`."""

import sys

from bench.cli import main

sys.exit(main())
