"""Shared plumbing for the zhllama stages: clean user-facing errors, hashing, run manifests."""
__version__ = "0.1.0"
