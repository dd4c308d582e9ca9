"""Composition: build relay from a Config, run it, reload it (a plan), drain it.

A reload is a plan: prepare (read, validate and build everything new), then commit (swap)
or abandon (keep the old config and say why).
"""
