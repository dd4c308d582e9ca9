"""The IMAP/POP3 proxy: sans-IO pre-login machines, upstream login, the byte pump, listeners."""
