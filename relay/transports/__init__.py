"""Upstream connections: one interface, connect(host, port) -> socket, direct, SOCKS5 or SSH."""
