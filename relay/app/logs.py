"""Process logging: one line format for the main and every listener process (stderr/journal)."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s relay[%(process)d]: %(name)s: %(levelname)s: %(message)s"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=LOG_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S", stream=sys.stderr)
    # Library chatter is not operator information.
    for noisy in ("mail.log", "asyncio", "asyncssh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
