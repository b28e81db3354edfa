"""Agents: the `Agent` protocol and the agents that ship with the relay (echo, command, silent).
Import the modules themselves; this package exports nothing."""
