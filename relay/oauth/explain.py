"""Identity-platform token errors (OAuth2 ``error``, Entra ID AADSTS codes) explained."""

from __future__ import annotations

import json
import re

from relay.errors import OAuthError

# OAuth2 ``error`` values (RFC 6749 section 5.2 and Microsoft's) -> operator hint.
ERROR_HINTS = {
    "invalid_client":
        "the client credentials were refused: the client secret is wrong or has expired "
        "(create a new one under the app registration's Certificates & secrets and update "
        "client_secret), or the certificate is not uploaded to the app registration",
    "invalid_grant":
        "the refresh token has expired or was revoked (password change, admin revocation, "
        "90 days unused; Google: 7 days while the consent screen is in Testing): sign in "
        "again to get a new refresh token (re-consent) and write it to refresh_token_file",
    "unauthorized_client":
        "the application may not use this grant: check that the app registration exists in "
        "this tenant and allows it (public client flows for refresh tokens)",
    "invalid_scope":
        "the scope is wrong: client_credentials needs https://outlook.office365.com/.default "
        "(Exchange Online) and refresh tokens need the scopes granted at consent",
    "invalid_request":
        "the token request is malformed or the tenant is wrong: check tenant, client_id and "
        "token_url",
    "consent_required":
        "an administrator must grant consent to the application's API permissions",
    "interaction_required":
        "the sign-in needs user interaction (MFA or Conditional Access): re-consent "
        "interactively or exempt the app",
    "temporarily_unavailable": "the identity platform is temporarily unavailable: relay retries",
    "server_error": "the identity platform failed: relay retries",
}

# Common Entra ID (Azure AD) AADSTS codes: what they mean in operator words.
AADSTS_HINTS = {
    "7000215": "invalid client secret: the value (not the secret id) must be configured",
    "7000222": "the client secret has expired: create a new one in the app registration",
    "700016": "application not found in the tenant: wrong client_id or tenant",
    "700024": "the client assertion is not within its valid time range: fix this host's clock",
    "700027": "the certificate is not registered on the app (or the key does not match it)",
    "70011": "invalid scope: use https://outlook.office365.com/.default for client_credentials",
    "70008": "the refresh token has expired due to inactivity: re-consent",
    "700082": "the refresh token has expired due to inactivity: re-consent",
    "50173": "the grant was revoked (password changed or sessions revoked): re-consent",
    "50076": "MFA is required for this sign-in: re-consent interactively",
    "53003": "blocked by a Conditional Access policy: ask the tenant admin",
    "65001": "admin consent is missing for the app's permissions: grant it in Entra ID",
    "90002": "tenant not found: check tenant",
    "900023": "the tenant id is malformed: check tenant",
    "500011": "the resource in scope is not in the tenant: check scope",
}

_AADSTS = re.compile(r"AADSTS(\d+)")


def token_error(status: int, body: bytes, *, source: str, url: str) -> OAuthError:
    """An OAuthError from a non-2xx (or error-carrying) token endpoint response."""
    error = description = ""
    codes: list[str] = []
    try:
        data = json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = str(data.get("error", ""))[:100]
        description = str(data.get("error_description", ""))[:500]
        raw_codes = data.get("error_codes")
        if isinstance(raw_codes, list):
            codes = [str(c) for c in raw_codes]
    codes += [c for c in _AADSTS.findall(description) if c not in codes]
    first_line = description.splitlines()[0] if description else ""
    if not error:
        msg = (f"token source {source}: {url} answered HTTP {status} without an OAuth2 error "
               f"({body[:200].decode('utf-8', 'replace')!r})")
        hint = ("check token_url" if 400 <= status < 500 else
                "the identity platform failed: relay retries")
        return OAuthError(msg, error=f"http_{status}", description="", hint=hint)
    hints = [AADSTS_HINTS[c] for c in codes if c in AADSTS_HINTS]
    hints.append(ERROR_HINTS.get(error, "see the identity platform's error description"))
    msg = f"token source {source}: {error}" + (f": {first_line}" if first_line else "")
    return OAuthError(msg, error=error, description=description, hint="; ".join(hints))
