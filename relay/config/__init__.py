"""Typed config (schema) and its loader: ``load_config(path)`` → validated ``Config``."""

from relay.config.loader import load_config

__all__ = ["load_config"]
