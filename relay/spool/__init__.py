"""The durable spool: the on-disk queue, the only hand-off between receiving and sending."""
