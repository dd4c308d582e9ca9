"""Steering a running relay: the control socket and the queue tools that use it."""
