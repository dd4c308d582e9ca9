"""Operations: the /metrics /healthz /readyz endpoint, systemd notify, certificate expiry."""
