"""Provider AUTH refusals explained: a table of real replies and what they must say."""

from __future__ import annotations

import base64
import json

import pytest

from relay.probe.hints import explain_auth_reply, explain_login_reply, provider_of

pytestmark = pytest.mark.fast

# (the provider relay knows the server is, or "" when it does not; code; reply; phrases)
CASES = [
    ("", 535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for "
              "the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
     ["SMTP AUTH is disabled", "SmtpClientAuthenticationDisabled", "security defaults",
      "SMTP.SendAsApp"]),
    ("microsoft", 535, "5.7.139 Authentication unsuccessful, basic authentication is disabled.",
     ["xoauth2"]),
    ("microsoft", 535, "5.7.139 Authentication unsuccessful, user is locked by your "
                       "organization's security defaults policy. Contact your administrator.",
     ["security defaults"]),
    ("microsoft", 535, "5.7.139 Authentication unsuccessful, the request did not meet the "
                       "criteria to be authenticated successfully. Contact your administrator.",
     ["Conditional Access"]),
    ("microsoft", 535, "5.7.139 Authentication unsuccessful, the user credentials were "
                       "incorrect.", ["wrong username or password"]),
    ("microsoft", 535, "5.7.139 Authentication unsuccessful", ["SMTP AUTH may be disabled",
                                                               "SMTP.SendAsApp"]),
    ("", 535, "5.7.3 Authentication unsuccessful [SN4PR0601CA0001.namprd06.prod.outlook.com]",
     ["SMTP.SendAsApp", "New-ServicePrincipal", "Add-MailboxPermission"]),
    ("microsoft", 530, "5.7.57 Client not authenticated to send mail.", ["not authenticated"]),
    ("microsoft", 550, "5.7.60 SMTP; Client does not have permissions to send as this sender",
     ["Send As"]),
    ("", 534, "5.7.9 Application-specific password required. Learn more at "
              "https://support.google.com/mail/?p=InvalidSecondFactor", ["app password",
                                                                         "xoauth2"]),
    ("", 534, "5.7.14 <https://accounts.google.com/signin/continue?...> Please log in via your "
              "web browser and then try again.", ["browser"]),
    ("", 535, "5.7.8 Username and Password not accepted. Learn more at "
              "https://support.google.com/mail/?p=BadCredentials", ["wrong username or password"]),
    ("google", 535, "5.7.8 Username and Password not accepted.", ["Google", "app password"]),
    ("", 454, "4.7.0 Too many login attempts, please try again later.", ["rate-limiting"]),
    ("", 538, "5.7.11 Encryption required for requested authentication mechanism", ["TLS"]),
    ("", 535, "Authentication failed", ["refused the credentials"]),
    ("", 451, "4.3.0 Temporary server error", ["temporary"]),
    # A custom server's codes say nothing of Google or Microsoft: the hint does not either.
    ("", 535, "5.7.8 Error: authentication failed: authentication failure",
     ["refused the credentials"]),
    ("", 535, "5.7.139 Authentication unsuccessful", ["refused the credentials"]),
    ("", 534, "5.7.9 Please use a stronger mechanism", ["too weak"]),
    ("", 530, "5.7.57 Client not authenticated to send mail.", ["requires AUTH"]),
]


@pytest.mark.parametrize(("provider", "code", "reply", "expected"), CASES)
def test_auth_reply_hints(provider: str, code: int, reply: str, expected: list[str]) -> None:
    hint = explain_auth_reply(code, reply, provider)
    for phrase in expected:
        assert phrase.lower() in hint.lower(), (reply, hint)
    # the code may be given inside the reply too
    assert explain_auth_reply(code, f"{code} {reply}", provider) == hint
    # a provider is named only when relay knows (its host, or the reply names it)
    says = ("google" if "google.com" in reply else "microsoft"
            if "aka.ms" in reply or "outlook.com" in reply else provider)
    if says != "google":
        assert "google" not in hint.lower() and "gmail" not in hint.lower(), hint
    if says != "microsoft":
        assert "exchange" not in hint.lower(), hint


@pytest.mark.parametrize(("names", "provider"), [
    (("smtp.office365.com",), "microsoft"), (("outlook.office365.com",), "microsoft"),
    (("imap.gmail.com",), "google"), (("mail.example.com", "google"), "google"),
    (("mail.example.com",), ""), (("notgmail.com",), ""), (("custom",), "")])
def test_who_the_server_belongs_to(names: tuple[str, ...], provider: str) -> None:
    assert provider_of(*names) == provider


def test_xoauth2_challenge_is_decoded() -> None:
    challenge = base64.b64encode(json.dumps(
        {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}
    ).encode()).decode()
    hint = explain_auth_reply(535, f"5.7.8 {challenge}")
    assert "OAuth2 token" in hint and "https://mail.google.com/" in hint


def test_login_reply_hints() -> None:
    assert "ImapEnabled" in explain_login_reply("a1 NO AUTHENTICATE failed.", "microsoft")
    assert "app password" in explain_login_reply("a1 NO [AUTHENTICATIONFAILED] Invalid "
                                                 "credentials (Failure)", "google")
    generic = explain_login_reply("a1 NO [AUTHENTICATIONFAILED] Authentication failed.")
    assert "check the username and password" in generic
    assert "Exchange" not in generic and "Gmail" not in generic
    assert "check the upstream" in explain_login_reply("-ERR something else")
