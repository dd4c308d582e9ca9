#!/bin/sh
# Create the SOCKS user Dante checks against the system password database, then run Dante.
set -eu
: "${DANTE_USER:?set DANTE_USER}"
: "${DANTE_PASSWORD:?set DANTE_PASSWORD}"
if ! id "$DANTE_USER" >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin "$DANTE_USER"
fi
printf '%s:%s\n' "$DANTE_USER" "$DANTE_PASSWORD" | chpasswd
exec "$@"
