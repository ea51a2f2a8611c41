"""`python -m daemon` is the same as the `confguard` console script."""

from daemon.commands.cli import main

raise SystemExit(main())
