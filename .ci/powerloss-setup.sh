#!/usr/bin/env bash
# Installs what tests/powerloss.rs needs, idempotently: fuse3 (fusermount3, libfuse3) and a
# Python venv with mfusepy for the power-loss simulator in ../shared/tools/powerloss/.
# Runs as root (apt-get); `apt-get update` only when an install finds no package.
#
# stdout: `export NAME=VALUE` lines for the test, nothing else (progress goes to stderr):
#   SLUICE_POWERLOSS_TOOL   the `powerloss` CLI (tests/powerloss.rs reads it)
#   POWERLOSS_PYTHON        the venv's python (the CLI reads it; shared/ is read-only, so the
#                           tool's own .venv cannot be created there)
# Usage:  eval "$(bash .ci/powerloss-setup.sh)"
#         cargo test --test powerloss -- --ignored
# Overrides: SLUICE_POWERLOSS_TOOL (tool path), SLUICE_POWERLOSS_VENV (venv dir, default
# target/powerloss-venv).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
log() { echo "powerloss-setup: $*" >&2; }

# shared/ sits beside the checkout; a clone made elsewhere (e.g. /tmp/ci) finds it beside the
# local repository it was cloned from.
tool="${SLUICE_POWERLOSS_TOOL:-$repo/../shared/tools/powerloss/powerloss}"
if [ ! -f "$tool" ] && [ -z "${SLUICE_POWERLOSS_TOOL:-}" ]; then
  origin="$(git -C "$repo" remote get-url origin 2>/dev/null || true)"
  if [ -n "$origin" ] && [ -d "$origin" ]; then
    tool="$origin/../shared/tools/powerloss/powerloss"
  fi
fi
if [ ! -f "$tool" ]; then
  log "the powerloss tool is not at $tool (shared/ must sit beside the clone or its origin)"
  exit 1
fi
tool="$(readlink -f "$tool")"
venv="${SLUICE_POWERLOSS_VENV:-$repo/target/powerloss-venv}"
MFUSEPY="mfusepy==3.1.1"

# Debian's python3 when present (python3-venv provides its venv/ensurepip).
py=/usr/bin/python3
[ -x "$py" ] || py="$(command -v python3 || true)"

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  log "apt-get install $*"
  if ! apt-get install -y --no-install-recommends "$@" >&2; then
    log "install failed: apt-get update, then retry"
    apt-get update >&2
    apt-get install -y --no-install-recommends "$@" >&2
  fi
}

pkgs=()
command -v fusermount3 >/dev/null 2>&1 || pkgs+=(fuse3)
if [ -z "$py" ]; then
  pkgs+=(python3 python3-venv)
elif ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  pkgs+=(python3-venv)
fi
if [ "${#pkgs[@]}" -gt 0 ]; then
  apt_install "${pkgs[@]}"
fi
[ -n "$py" ] || py=/usr/bin/python3

if ! "$venv/bin/python" -c 'import mfusepy' >/dev/null 2>&1; then
  log "creating $venv with $MFUSEPY"
  rm -rf "$venv"
  "$py" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$MFUSEPY" >&2
fi
# Importing mfusepy loads libfuse3: this checks the library too.
"$venv/bin/python" -c 'import mfusepy' >&2

[ -e /dev/fuse ] || log "warning: /dev/fuse is missing; mounting will fail"

printf 'export SLUICE_POWERLOSS_TOOL=%q\n' "$tool"
printf 'export POWERLOSS_PYTHON=%q\n' "$venv/bin/python"
