"""Verdicts on a session or a message: provider-profile limits and SPF.

Checks judge (they raise ``relay.verdict.Refusal``); the listener turns a verdict into a reply.
"""
