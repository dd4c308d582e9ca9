"""The SMTP listener: aiosmtpd sessions in relay's loop that refuse or accept mail.

Public surface (everything else in this package is private to it):

- ``SmtpListener(cfg, *, hostname, accept, maillog, checks=None, users=None, metrics=None)``
  with ``start()``, ``reconfigure(...)``, ``stop_accepting()``, ``wait_closed(timeout)``;
- ``AcceptFn``, ``Checks`` / ``BaseChecks``, ``SessionInfo``: the seams the app plugs in;
- ``Refusal``: what a check raises to refuse with a full SMTP reply;
- ``UserDB``: the users file that AUTH is checked against.
"""

from relay.smtp.auth import UserDB
from relay.smtp.hooks import AcceptFn, BaseChecks, Checks, SessionInfo
from relay.smtp.listener import SmtpListener, build_tls_context
from relay.smtp.replies import Refusal

__all__ = ["AcceptFn", "BaseChecks", "Checks", "Refusal", "SessionInfo", "SmtpListener",
           "UserDB", "build_tls_context"]
