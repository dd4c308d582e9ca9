"""The IMAP/POP3 proxy: pre-auth machines, upstream login, the splice pump, listeners."""

from relay.proxy.accounts import (
    MappedAuthenticator,
    PassthroughAuthenticator,
    build_authenticator,
    users_file_verify,
)
from relay.proxy.listener import ProxyListener
from relay.proxy.session import Authenticator
from relay.proxy.upstream import UpstreamCredentials, login_upstream

__all__ = ["Authenticator", "MappedAuthenticator", "PassthroughAuthenticator", "ProxyListener",
           "UpstreamCredentials", "build_authenticator", "login_upstream", "users_file_verify"]
