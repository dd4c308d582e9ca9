"""What every subcommand shares: the -c option and the config lookup order it documents."""

from __future__ import annotations

import argparse
from pathlib import Path

from relay.config.lookup import ORDER, find_config

CONFIG_HELP = f"config file; looked up in this order: {ORDER}"


def add_config_arg(parser: argparse.ArgumentParser, *, what: str = "") -> None:
    """``-c/--config FILE`` with the lookup order in its help."""
    parser.add_argument("-c", "--config", metavar="FILE",
                        help=(f"{what}; " if what else "") + CONFIG_HELP)


def config_path(given: str | None) -> Path:
    """The config file a command uses (``-c`` value or the lookup), or ConfigError."""
    return find_config(given)
