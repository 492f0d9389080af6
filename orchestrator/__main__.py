"""``python -m orchestrator ...`` = ``bamray ...``."""

from orchestrator.cli import main

raise SystemExit(main())
