"""`python -m daemon.sandbox`: the same as `confguard sandbox`."""

from daemon.commands.sandbox import main

raise SystemExit(main())
