#!/usr/bin/env bash
# Installs the Debian tools the tests drive for real (promtool / prometheus) when they are missing.
# Needs root or passwordless sudo; otherwise it says what is missing and the dependent tests skip.
set -uo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "ensure_system_deps: missing ${need[*]} and no root: tests that need them will skip" >&2; exit 0; fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || true
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
  || echo "ensure_system_deps: could not install ${need[*]}: tests that need them will skip" >&2
exit 0
