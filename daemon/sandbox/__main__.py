"""`python -m daemon.sandbox`: the same as `confguard sandbox`."""

from daemon.sandbox.cli import main

raise SystemExit(main())
