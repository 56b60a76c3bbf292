"""`python -m ldm ...` (also what `accelerate launch -m ldm` runs)."""

from .cli import main

raise SystemExit(main())
