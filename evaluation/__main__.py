"""`python -m evaluation classifier|denoiser ...` (same as `normserve eval ...`)."""

from evaluation.cli import main

raise SystemExit(main())
