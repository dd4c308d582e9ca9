"""Where relay's config file is: -c FILE, then $RELAY_CONFIG, then /etc/relay/relay.toml,
then ./conf/relay.toml (relative to the current directory).

Every command finds its config this way, so ``relay status`` on a systemd host (the unit
runs ``relay run -c /etc/relay/relay.toml``), ``docker exec relay relay queue list`` (the
image sets ``RELAY_CONFIG``) and the quick start (``./conf/relay.toml`` in a checkout) all
find the file the running relay uses. A file named explicitly (``-c`` or the variable)
that does not exist is an error; relay never falls back past it to another file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from relay.errors import ConfigError, RelayError

SYSTEM_CONFIG = Path("/etc/relay/relay.toml")
LOCAL_CONFIG = Path("conf/relay.toml")
ENV_VAR = "RELAY_CONFIG"
ORDER = ("-c FILE, then $RELAY_CONFIG, then /etc/relay/relay.toml, then ./conf/relay.toml "
         "(from the current directory)")


def _order_hint(tried: str) -> str:
    return f"{tried}; relay looks for its config in this order: {ORDER}"


def find_config(given: str | os.PathLike[str] | None = None, *,
                environ: Mapping[str, str] | None = None,
                system: Path = SYSTEM_CONFIG, cwd: Path | None = None) -> Path:
    """The config file to use; ConfigError (a named file is missing) or RelayError (none
    found) saying where relay looked and in what order."""
    env = os.environ if environ is None else environ
    here = Path.cwd() if cwd is None else cwd
    if given is not None and str(given) != "":
        path = Path(given)
        full = path if path.is_absolute() else here / path
        if not full.exists():
            raise ConfigError("config file not found", file=str(given),
                              hint=_order_hint(f"looked for {full} (given with -c)"))
        return path
    named = env.get(ENV_VAR, "")
    if named:
        path = Path(named)
        full = path if path.is_absolute() else here / path
        if not full.exists():
            raise ConfigError("config file not found", file=named,
                              hint=_order_hint(f"looked for {full} (named by ${ENV_VAR})"))
        return path
    local = here / LOCAL_CONFIG
    for candidate, shown in ((system, system), (local, LOCAL_CONFIG)):
        if candidate.is_file():
            return shown
    raise RelayError("no config file found",
                     hint=_order_hint(f"no -c FILE, ${ENV_VAR} is not set, and neither "
                                       f"{system} nor {local} exists"))
