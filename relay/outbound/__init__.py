"""Sending: scheduler, one delivery attempt, couriers (SMTP, outbox), pacing, bounces.

The sending side meets the receiving side only through the spool: nothing here imports
the SMTP listener (``relay.smtp``) or aiosmtpd.
"""
