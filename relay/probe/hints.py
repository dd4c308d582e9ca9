"""What a provider's AUTH refusal means for the operator (Exchange Online, Gmail, generic).

A hint names a provider only when relay knows the server is that provider's.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

# (the provider a hint is about, or "" for any server; pattern on "CODE TEXT"; hint),
# most specific first, matched case-insensitively. A provider's hint applies only when
# relay knows the server is that provider's (its host, its token source, or its reply
# naming it): a 535 5.7.8 from a custom server is not Google's.
_SMTP_RULES: tuple[tuple[str, str, str], ...] = (
    ("microsoft", r"smtpclientauthentication is disabled",
     "Exchange Online: SMTP AUTH is disabled for the tenant or this mailbox. Enable it for "
     "the mailbox (Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled "
     "$false) or tenant-wide (Set-TransportConfig -SmtpClientAuthenticationDisabled $false); "
     "security defaults also block it. With auth = \"xoauth2\" the app also needs "
     "SMTP.SendAsApp and mailbox permission for its service principal."),
    ("microsoft", r"basic authentication is disabled|basicauthblocked",
     "Exchange Online has switched basic authentication off for SMTP AUTH: use auth = "
     "\"xoauth2\" with a token source (client_credentials needs SMTP.SendAsApp)."),
    ("microsoft", r"security defaults|locked by your organization",
     "Exchange Online: the tenant's security defaults (or a Conditional Access policy) block "
     "this sign-in: use auth = \"xoauth2\", or have the tenant admin exclude the mailbox."),
    ("microsoft", r"did not meet the criteria to be authenticated",
     "Exchange Online: a Conditional Access policy or MFA requirement refused the sign-in: "
     "ask the tenant admin, or use auth = \"xoauth2\" with an app registration."),
    ("microsoft", r"user credentials were incorrect",
     "Exchange Online: wrong username or password for this mailbox (the username is the "
     "full address)."),
    ("microsoft", r"^535 5\.7\.139",
     "Exchange Online refused the sign-in: SMTP AUTH may be disabled for the mailbox or "
     "tenant, security defaults may be enabled, or (xoauth2) the app lacks SMTP.SendAsApp or "
     "mailbox permissions for its service principal."),
    ("microsoft", r"^535 5\.7\.3",
     "Exchange Online: authentication unsuccessful. With a password: wrong credentials or SMTP "
     "AUTH disabled for the mailbox. With xoauth2: the token lacks SMTP.SendAsApp (app) or "
     "SMTP.Send (delegated), the service principal was not registered in Exchange "
     "(New-ServicePrincipal) or has no permission on the mailbox (Add-MailboxPermission), or "
     "the username is not the mailbox the token is for."),
    ("microsoft", r"5\.7\.57",
     "Exchange Online: the client is not authenticated: relay sent MAIL before a successful "
     "AUTH; set auth on the upstream (SMTP AUTH submission on port 587 needs it)."),
    ("microsoft", r"5\.7\.60",
     "Exchange Online: this mailbox may not send as the envelope sender: grant Send As to the "
     "mailbox, or map the sender to its own mailbox in [[account]]."),
    ("microsoft", r"5\.7\.70[58]",
     "Exchange Online has restricted the tenant from sending (suspected spam or a compromised "
     "account): the tenant admin must contact Microsoft support."),
    ("google", r"application-specific password required|^534 5\.7\.9",
     "Google: the account uses 2-Step Verification: use an app password, or better auth = "
     "\"xoauth2\" with a refresh_token source (scope https://mail.google.com/)."),
    ("google", r"please log in (via|with) your web browser|^534 5\.7\.14",
     "Google blocked this sign-in (unusual location or less secure apps disabled): sign in "
     "once in a browser from this network, or use auth = \"xoauth2\"."),
    ("google", r"username and password not accepted|^535 5\.7\.8",
     "Google: wrong username or password (with 2-Step Verification use an app password; with "
     "xoauth2 the token is invalid, expired or lacks scope https://mail.google.com/)."),
    ("", r"too many login attempts|^454 4\.7\.0",
     "the provider is rate-limiting logins from this address: relay defers and retries; "
     "check that no client is retrying with wrong credentials."),
    ("", r"^530 |5\.7\.0 authentication required|5\.7\.57|not authenticated",
     "the provider requires AUTH before mail: set auth on the upstream."),
    ("", r"^538 |5\.7\.11",
     "the provider requires TLS before AUTH: set tls = \"starttls\" or \"implicit\"."),
    ("", r"^534 ",
     "the provider considers the AUTH mechanism too weak: use TLS and auth = \"xoauth2\"."),
    ("", r"^535 ",
     "the provider refused the credentials: check the upstream's username and password or "
     "token source."),
    ("", r"^454 ",
     "temporary authentication failure at the provider: relay defers and retries."),
)

# A reply that names its provider (a help link, an Exchange-only phrase) says who it is.
_SAYS_WHO = (("microsoft", r"aka\.ms/|microsoft|office365|outlook\.com|"
                           r"smtpclientauthentication|basicauthblocked"),
             ("google", r"google\.com|gmail"))

# Hosts whose provider relay knows (the host or tls_server_name ends with one).
_HOSTS = (("microsoft", ("office365.com", "outlook.com", "microsoft.com", "office.com")),
          ("google", ("gmail.com", "google.com", "googlemail.com")))


def provider_of(*names: str) -> str:
    """``microsoft``, ``google`` or ``""`` for the hosts (or token provider) given."""
    for name in names:
        n = name.lower().rstrip(".")
        if n in ("microsoft", "google"):
            return n
        for provider, suffixes in _HOSTS:
            if any(n == s or n.endswith("." + s) for s in suffixes):
                return provider
    return ""


def _who(text: str, provider: str) -> str:
    if provider:
        return provider
    return next((who for who, pattern in _SAYS_WHO if re.search(pattern, text, re.I)), "")


def explain_auth_reply(code: int, reply: str, provider: str = "") -> str:
    """An operator hint for an SMTP AUTH refusal (``reply`` with or without the code);
    ``provider`` (``microsoft``, ``google``) when relay knows whose server it is."""
    text = reply.strip()
    if not text.startswith(str(code)):
        text = f"{code} {text}"
    oauth = _xoauth2_challenge(text)
    if oauth:
        return oauth
    known = _who(text, provider)
    for who, pattern, hint in _SMTP_RULES:
        if (not who or who == known) and re.search(pattern, text, re.IGNORECASE):
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


_LOGIN_REFUSED = r"authenticate failed|authentication failed|logon failure|invalid credentials"
_LOGIN_HINTS = {
    "microsoft": "Exchange Online refused the login: IMAP/POP may be disabled for the mailbox "
                 "(Set-CASMailbox -ImapEnabled/-PopEnabled $true), basic auth is off (use "
                 "xoauth2), or the app lacks IMAP.AccessAsApp/POP.AccessAsApp and mailbox "
                 "permission.",
    "google": "Gmail refused the login: wrong credentials, or the account needs an app "
              "password (2-Step Verification) or auth = \"xoauth2\"; IMAP/POP must be enabled "
              "in Gmail's settings.",
    "": "the server refused the login: check the username and password (or token source) "
        "the upstream logs in with.",
}


def explain_login_reply(reply: str, provider: str = "") -> str:
    """An operator hint for an IMAP ``NO``/``BAD`` or POP3 ``-ERR`` login refusal."""
    oauth = _xoauth2_challenge(reply)
    if oauth:
        return oauth
    if re.search(r"\[unavailable\]|temporar", reply, re.IGNORECASE):
        return "temporary failure at the provider: try again later."
    if re.search(_LOGIN_REFUSED, reply, re.IGNORECASE):
        return _LOGIN_HINTS[_who(reply, provider)]
    return "the provider refused the login: check the upstream's credentials and auth setting."
