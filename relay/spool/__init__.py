"""The durable spool: the on-disk queue between the SMTP listener and the scheduler."""

from relay.spool.layout import is_queue_id
from relay.spool.lock import SpoolLock
from relay.spool.records import Envelope, QueuedMessage, QueueState, RcptStatus, Recipient
from relay.spool.store import Spool, SpoolStats

__all__ = ["Envelope", "QueueState", "QueuedMessage", "RcptStatus", "Recipient", "Spool",
           "SpoolLock", "SpoolStats", "is_queue_id"]
