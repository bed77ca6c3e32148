"""Subcommands of the `tokentrust` command line (each module has `register(subparsers)`)."""
