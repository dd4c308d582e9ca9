"""glibc's allocator in relay's long-running processes: no page faults per socket read.

asyncio reads a socket into a fresh 256 KB ``bytes`` and shrinks it to what arrived.
glibc serves an allocation above its mmap threshold (128 KB, raised only when a mapping
that large is freed) with a new private mapping: the kernel hands out zeroed pages, one
minor fault per 4 KB the read fills, and the mapping is shrunk and unmapped again.
Because the buffer is shrunk before it is freed, the threshold never rises, and every
read of a large message pays the faults again. Measured with relay's SMTP session alone
(``tests/smtp/measure_data_path.py``'s run, 100 KB messages from smtp-source, 20
sessions): 44-59 minor faults and 0.70-0.73 ms of CPU per message by default; 0.7
faults and 0.60 ms with the threshold at ``MMAP_THRESHOLD``. 1 KB messages take no
faults either way.

With a fixed threshold glibc also stops adapting its trim threshold, so that is set
too: the heap gives free memory at its top back to the kernel once more than
``TRIM_THRESHOLD`` of it is free (by default 128 KB, which would make the heap shrink
and grow back, faulting, message after message). Allocations above ``MMAP_THRESHOLD``
(a message of several MB) are still mapped and unmapped on their own.

An operator's own ``MALLOC_*`` environment or ``glibc.malloc`` tunables are left as
they are; with a C library that has no ``mallopt`` (musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from typing import Any

M_TRIM_THRESHOLD = -1           # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20        # bytes: below this, from the heap (asyncio's reads: 256 KB)
TRIM_THRESHOLD = 8 << 20        # bytes free at the heap's top before it is given back


def operator_set(environ: Mapping[str, str]) -> bool:
    """True if the environment already tunes glibc's malloc."""
    return any(k.startswith("MALLOC_") for k in environ) or \
        "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def tune_allocator(environ: Mapping[str, str] | None = None, libc: Any = None) -> bool:
    """Set the two thresholds; False (and nothing changed) when left to the operator or
    when the C library has no ``mallopt``."""
    if operator_set(os.environ if environ is None else environ):
        return False
    if libc is None:
        try:
            libc = ctypes.CDLL(None)
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
