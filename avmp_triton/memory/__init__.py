"""The allocators (device) and their pure-Python model, which share one set of semantics."""
