"""`python -m export`: same as `normserve export`."""

import sys

from export.cli import main

sys.exit(main())
