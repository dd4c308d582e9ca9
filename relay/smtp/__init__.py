"""The SMTP listener: relay's own sessions in its loop, the DATA reader, AUTH, DATA → 250."""
