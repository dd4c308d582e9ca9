"""Typed config (schema) and its loader (relay.config.loader.load_config) with FILE:LINE errors."""
