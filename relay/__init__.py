"""relay: a mail relay proxy for contact centers."""

__version__ = "0.1.0"
