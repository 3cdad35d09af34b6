#!/usr/bin/env bash
# Debian's chromium for the dashboard's browser test (Playwright drives it through
# executable_path=/usr/bin/chromium; Playwright's own browser downloads do not work here).
# Idempotent: does nothing when /usr/bin/chromium is already installed.
set -euo pipefail

log() { echo "chromium.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if [ -x /usr/bin/chromium ]; then
    log "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo unknown version)"
    exit 0
fi
log "installing chromium with apt-get"
as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    chromium fonts-dejavu-core >&2
log "installed: $(/usr/bin/chromium --version 2>/dev/null || echo unknown version)"
