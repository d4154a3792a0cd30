"""`python -m normserve.evaluation classifier|denoiser ...` (same as `normserve eval ...`)."""

from normserve.evaluation.cli import main

raise SystemExit(main())
