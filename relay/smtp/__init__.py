"""The SMTP listener: aiosmtpd sessions in relay's loop, the DATA reader, AUTH, DATA → 250."""
