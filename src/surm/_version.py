"""The version of surm, in a module that imports nothing (the command line reads it)."""

__version__ = "0.1.0"
