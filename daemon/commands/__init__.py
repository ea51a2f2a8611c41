"""The `confguard` command line: one module per subcommand."""
