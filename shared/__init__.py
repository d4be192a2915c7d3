"""The shared reliability kit of the worker, ingest and Reply Guy bots."""

__version__ = "0.1.0"
