"""What a provider's AUTH refusal means for the operator (Exchange Online, Gmail, generic)."""

from __future__ import annotations

import base64
import binascii
import json
import re

# (pattern on "CODE TEXT", hint), most specific first. Matched case-insensitively.
_SMTP_RULES: tuple[tuple[str, str], ...] = (
    (r"smtpclientauthentication is disabled",
     "Exchange Online: SMTP AUTH is disabled for the tenant or this mailbox. Enable it for "
     "the mailbox (Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled "
     "$false) or tenant-wide (Set-TransportConfig -SmtpClientAuthenticationDisabled $false); "
     "security defaults also block it. With auth = \"xoauth2\" the app also needs "
     "SMTP.SendAsApp and mailbox permission for its service principal."),
    (r"basic authentication is disabled|basicauthblocked",
     "Exchange Online has switched basic authentication off for SMTP AUTH: use auth = "
     "\"xoauth2\" with a token source (client_credentials needs SMTP.SendAsApp)."),
    (r"security defaults|locked by your organization",
     "Exchange Online: the tenant's security defaults (or a Conditional Access policy) block "
     "this sign-in: use auth = \"xoauth2\", or have the tenant admin exclude the mailbox."),
    (r"did not meet the criteria to be authenticated",
     "Exchange Online: a Conditional Access policy or MFA requirement refused the sign-in: "
     "ask the tenant admin, or use auth = \"xoauth2\" with an app registration."),
    (r"user credentials were incorrect",
     "Exchange Online: wrong username or password for this mailbox (the username is the "
     "full address)."),
    (r"^535 5\.7\.139",
     "Exchange Online refused the sign-in: SMTP AUTH may be disabled for the mailbox or "
     "tenant, security defaults may be enabled, or (xoauth2) the app lacks SMTP.SendAsApp or "
     "mailbox permissions for its service principal."),
    (r"^535 5\.7\.3",
     "Exchange Online: authentication unsuccessful. With a password: wrong credentials or SMTP "
     "AUTH disabled for the mailbox. With xoauth2: the token lacks SMTP.SendAsApp (app) or "
     "SMTP.Send (delegated), the service principal was not registered in Exchange "
     "(New-ServicePrincipal) or has no permission on the mailbox (Add-MailboxPermission), or "
     "the username is not the mailbox the token is for."),
    (r"5\.7\.57",
     "Exchange Online: the client is not authenticated: relay sent MAIL before a successful "
     "AUTH; set auth on the upstream (SMTP AUTH submission on port 587 needs it)."),
    (r"5\.7\.60",
     "Exchange Online: this mailbox may not send as the envelope sender: grant Send As to the "
     "mailbox, or map the sender to its own mailbox in [[account]]."),
    (r"5\.7\.70[58]",
     "Exchange Online has restricted the tenant from sending (suspected spam or a compromised "
     "account): the tenant admin must contact Microsoft support."),
    (r"application-specific password required|^534 5\.7\.9",
     "Google: the account uses 2-Step Verification: use an app password, or better auth = "
     "\"xoauth2\" with a refresh_token source (scope https://mail.google.com/)."),
    (r"please log in (via|with) your web browser|^534 5\.7\.14",
     "Google blocked this sign-in (unusual location or less secure apps disabled): sign in "
     "once in a browser from this network, or use auth = \"xoauth2\"."),
    (r"username and password not accepted|^535 5\.7\.8",
     "Google: wrong username or password (with 2-Step Verification use an app password; with "
     "xoauth2 the token is invalid, expired or lacks scope https://mail.google.com/)."),
    (r"too many login attempts|^454 4\.7\.0",
     "the provider is rate-limiting logins from this address: relay defers and retries; "
     "check that no client is retrying with wrong credentials."),
    (r"^530 |5\.7\.0 authentication required",
     "the provider requires AUTH before mail: set auth on the upstream."),
    (r"^538 |5\.7\.11",
     "the provider requires TLS before AUTH: set tls = \"starttls\" or \"implicit\"."),
    (r"^534 ",
     "the provider considers the AUTH mechanism too weak: use TLS and auth = \"xoauth2\"."),
    (r"^535 ",
     "the provider refused the credentials: check the upstream's username and password or "
     "token source."),
    (r"^454 ",
     "temporary authentication failure at the provider: relay defers and retries."),
)


def explain_auth_reply(code: int, reply: str) -> str:
    """An operator hint for an SMTP AUTH refusal (``reply`` with or without the code)."""
    text = reply.strip()
    if not text.startswith(str(code)):
        text = f"{code} {text}"
    oauth = _xoauth2_challenge(text)
    if oauth:
        return oauth
    for pattern, hint in _SMTP_RULES:
        if re.search(pattern, text, re.IGNORECASE):
            return hint
    if 400 <= code < 500:
        return "temporary failure at the provider: relay defers and retries."
    return "the provider refused AUTH: check the upstream's credentials and its auth setting."


def _xoauth2_challenge(text: str) -> str:
    """Gmail and Exchange answer a bad XOAUTH2 token with a base64 JSON challenge."""
    for word in text.split():
        if len(word) < 16:
            continue
        try:
            data = json.loads(base64.b64decode(word + "=" * (-len(word) % 4), validate=True))
        except (binascii.Error, ValueError):
            continue
        if isinstance(data, dict) and "status" in data:
            scope = data.get("scope", "")
            return (f"the provider rejected the OAuth2 token (status {data['status']}"
                    + (f", required scope {scope}" if scope else "") + "): it is expired, "
                    "revoked, for another user, or lacks that scope; check the token source.")
    return ""


_LOGIN_RULES: tuple[tuple[str, str], ...] = (
    (r"authenticate failed|authentication failed|logon failure",
     "the provider refused the login. Exchange Online: IMAP/POP may be disabled for the "
     "mailbox (Set-CASMailbox -ImapEnabled/-PopEnabled $true), basic auth is off (use "
     "xoauth2), or the app lacks IMAP.AccessAsApp/POP.AccessAsApp and mailbox permission. "
     "Gmail: wrong credentials or an app password / xoauth2 is required."),
    (r"\[unavailable\]|temporar",
     "temporary failure at the provider: try again later."),
)


def explain_login_reply(reply: str) -> str:
    """An operator hint for an IMAP ``NO``/``BAD`` or POP3 ``-ERR`` login refusal."""
    oauth = _xoauth2_challenge(reply)
    if oauth:
        return oauth
    for pattern, hint in _LOGIN_RULES:
        if re.search(pattern, reply, re.IGNORECASE):
            return hint
    return "the provider refused the login: check the upstream's credentials and auth setting."
