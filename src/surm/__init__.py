"""surm: structured unrestricted-rank matrices for parameter-efficient fine-tuning."""

__version__ = "0.1.0"
