"""Verdicts on a session or a message: provider profiles, SPF, routes.

Checks judge (they raise ``relay.verdict.Refusal``); the listener turns a verdict into a reply.
"""
