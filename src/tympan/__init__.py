"""tympan: versioned, tuned, tracked and servable audio models."""

__version__ = "0.1.0"
