"""Stores: the `Backend` protocol and its change hub, the memory and SQLite backends, and the
agent-reply runner any store uses. Import the modules themselves; this package exports nothing."""
