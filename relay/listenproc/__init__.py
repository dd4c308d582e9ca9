"""SMTP listeners in their own processes; the main process keeps delivery (see supervisor)."""
