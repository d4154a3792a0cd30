"""`python -m normserve.export`: same as `normserve export`."""

import sys

from normserve.export.cli import main

sys.exit(main())
