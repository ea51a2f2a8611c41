"""`python -m daemon` is the same as the `confguard` console script."""

from daemon.cli import main

raise SystemExit(main())
