"""browservm: one isolated browser microVM per user session."""

__version__ = "0.1.0"
