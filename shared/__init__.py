"""Code the api and the workers both use: settings, database, ledger arithmetic, NATS, CLI."""
