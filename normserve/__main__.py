"""`python -m normserve` is the `normserve` command."""

import sys

from normserve.cli import main

sys.exit(main())
