#!/usr/bin/env bash
# Builds the operator and trainer images with podman (no Docker daemon, no registry access).
#   hack/build-images.sh [base|operator|trainer|all]      (default: all)
#
# base      localhost/finetune-base:bookworm, made from Debian packages with mmdebstrap
#           (minbase + python3 3.11, python3-venv, ca-certificates) and `podman import`.
#           The rootfs tar and the image are cached, keyed by suite+packages+mirrors: a second
#           run reuses them. Both Dockerfiles take it as BASE_IMAGE instead of their pinned
#           upstream default (python:3.11.13-slim-bookworm / pytorch/pytorch:2.13.0-...).
# operator  $OPERATOR_IMG (default localhost/finetune-operator:dev) from ./Dockerfile
# trainer   $TRAINER_IMG  (default localhost/finetune-trainer:dev)  from trainer-image/Dockerfile;
#           on the Debian base torch 2.13.0 and its CUDA wheels come from PyPI (~2.6 GB).
# Wheels are kept in a local wheelhouse ($WHEELHOUSE) and the builds install from it offline:
# pip's own HTTP cache (the Dockerfiles' cache mount, which does the job in CI) stays empty
# behind proxies that strip PyPI's caching headers, as this machine's does.
#
# Environment:
#   BASE_IMAGE=upstream        use each Dockerfile's pinned upstream base (needs that registry)
#   BASE_IMAGE=<ref>           use <ref> for both images; default: the local Debian base
#   OPERATOR_BASE_IMAGE / TRAINER_BASE_IMAGE   per-image override of the above
#   LOCAL_BASE_IMAGE           name of the local base (default localhost/finetune-base:bookworm)
#   BUILD_CACHE_DIR            rootfs tar and wheelhouse (default ~/.cache/finetune-images)
#   WHEELHOUSE                 default $BUILD_CACHE_DIR/wheels; empty: pip uses the index
#                              (always so with BASE_IMAGE=upstream)
#   BUILD_CA_BUNDLE            CA bundle mounted over the base's one during the build (default
#                              the host's /etc/ssl/certs/ca-certificates.crt; empty: none)
#   DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR     apt mirrors for mmdebstrap
#   REVISION                   org.opencontainers.image.revision (default: git HEAD, +dirty)
#   PODMAN_BUILD_ARGS          extra arguments for `podman build` (e.g. --no-cache)
# Installs podman, buildah, runc, mmdebstrap (apt) when missing. Nothing mounted into a build
# (CA bundle, wheelhouse) is stored in an image. Progress lines at least every 30 s; logs in
# $BUILD_LOG_DIR (default /tmp/finetune-build-images). The last lines printed (stdout) are
# the built image references.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-all}

OPERATOR_IMG=${OPERATOR_IMG:-localhost/finetune-operator:dev}
TRAINER_IMG=${TRAINER_IMG:-localhost/finetune-trainer:dev}
LOCAL_BASE_IMAGE=${LOCAL_BASE_IMAGE:-localhost/finetune-base:bookworm}
BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE_IMAGE}
OPERATOR_BASE_IMAGE=${OPERATOR_BASE_IMAGE:-$BASE_IMAGE}
TRAINER_BASE_IMAGE=${TRAINER_BASE_IMAGE:-$BASE_IMAGE}
BUILD_CACHE_DIR=${BUILD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-images}
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BASE_PACKAGES=python3,python3-venv,ca-certificates
# crun fails on hybrid cgroup hosts; runc works everywhere podman does.
RUNTIME=${PODMAN_RUNTIME:-runc}
LOG_DIR=${BUILD_LOG_DIR:-${TMPDIR:-/tmp}/finetune-build-images}
# Explicit limits: podman's defaults exceed what some hosts allow (runc then fails with
# "error setting rlimit"); never ask for more than this shell's hard limits.
cap() { local want=$1 hard=$2; [ "$hard" = unlimited ] || [ "$hard" -ge "$want" ] && echo "$want" || echo "$hard"; }
NOFILE=$(cap 65536 "$(ulimit -Hn)")
NPROC=$(cap 8192 "$(ulimit -Hu)")
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

log() { printf '[build-images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else log "need root to run: $*"; return 1
  fi
}

install_tools() {
  local missing=() cmd pkg
  for cmd in podman:podman buildah:buildah runc:runc mmdebstrap:mmdebstrap newuidmap:uidmap fuse-overlayfs:fuse-overlayfs; do
    pkg=${cmd#*:}; cmd=${cmd%%:*}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get: install them by hand"
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq >&2
  as_root apt-get install -y -qq --no-install-recommends podman buildah runc mmdebstrap uidmap fuse-overlayfs >&2
}

# run_logged LABEL LOGFILE CMD...: runs CMD with its output in LOGFILE, echoes the lines that
# matter (build steps, errors) and a progress line every 30 s; on failure the log's tail.
run_logged() {
  local label=$1 logfile=$2; shift 2
  local start=$SECONDS rc=0 ticker
  : > "$logfile"
  (
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    size=0 quiet=0
    while :; do
      sleep 30 & nap=$!
      wait "$nap"
      last=$(tail -c 4000 "$logfile" 2>/dev/null | tr '\r' '\n' | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-120)
      if [ "$(stat -c %s "$logfile" 2>/dev/null || echo 0)" = "$size" ]; then
        quiet=$((quiet + 30))  # e.g. podman writing a multi-GB layer: no output meanwhile
        log "$label: still running ($((SECONDS - start))s, no new output for ${quiet}s)${last:+ - last: $last}"
      else
        size=$(stat -c %s "$logfile" 2>/dev/null || echo 0) quiet=0
        log "$label: still running ($((SECONDS - start))s)${last:+ - $last}"
      fi
    done
  ) &
  ticker=$!
  trap 'kill "$ticker" 2>/dev/null' EXIT
  set +e
  "$@" 2>&1 | tee -a "$logfile" \
    | grep --line-buffered -E '^(\[[0-9]+/[0-9]+\] )?(STEP [0-9]+/|COMMIT)|^Error' \
    | while IFS= read -r line; do log "$label: ${line:0:140}"; done
  rc=${PIPESTATUS[0]}
  set -e
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  trap - EXIT
  if [ "$rc" -ne 0 ]; then
    log "$label failed (exit $rc) after $((SECONDS - start))s; last lines of $logfile:"
    tail -n 40 "$logfile" >&2
    return "$rc"
  fi
  log "$label: done in $((SECONDS - start))s"
}

base_key() {
  printf '%s\n' "$DEBIAN_SUITE" minbase "$BASE_PACKAGES" "$DEBIAN_MIRROR" "$DEBIAN_SECURITY_MIRROR" \
    | sha256sum | cut -c1-12
}

build_base() {
  local key tar keyed
  [ -z "$base_done" ] || return 0
  base_done=1
  key=$(base_key)
  keyed="${LOCAL_BASE_IMAGE%:*}:${DEBIAN_SUITE}-$key"
  if podman image exists "$keyed"; then
    log "base: $keyed is up to date (packages unchanged), reusing it"
    podman tag "$keyed" "$LOCAL_BASE_IMAGE"
    return 0
  fi
  mkdir -p "$BUILD_CACHE_DIR"
  tar="$BUILD_CACHE_DIR/rootfs-$DEBIAN_SUITE-minbase-$key.tar"
  if [ -s "$tar" ]; then
    log "base: reusing the cached rootfs $tar"
  else
    log "base: mmdebstrap $DEBIAN_SUITE minbase + $BASE_PACKAGES -> $tar"
    # Documentation and man pages are left out (copyright files stay); apt lists and caches
    # are removed by mmdebstrap's own cleanup.
    mkdir -p "$LOG_DIR"
    run_logged "base: mmdebstrap" "$LOG_DIR/mmdebstrap.log" \
      mmdebstrap --variant=minbase --format=tar --include="$BASE_PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --aptopt='Acquire::Retries "3"' \
        "$DEBIAN_SUITE" "$tar.partial" \
        "deb $DEBIAN_MIRROR $DEBIAN_SUITE main" \
        "deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main" \
        "deb $DEBIAN_SECURITY_MIRROR $DEBIAN_SUITE-security main"
    mv "$tar.partial" "$tar"
  fi
  log "base: podman import -> $keyed"
  local t0=$SECONDS
  podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "mmdebstrap $DEBIAN_SUITE minbase $BASE_PACKAGES" \
    "$tar" "$keyed" >/dev/null
  podman tag "$keyed" "$LOCAL_BASE_IMAGE"
  log "base: imported in $((SECONDS - t0))s"
}

project_version() {
  sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/pyproject.toml" | head -n 1
}

revision() {
  if [ -n "${REVISION:-}" ]; then echo "$REVISION"; return; fi
  local rev
  rev=$(git -C "$root" rev-parse HEAD 2>/dev/null) || { echo unknown; return; }
  [ -z "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ] || rev="$rev-dirty"
  echo "$rev"
}

human_size() {
  numfmt --to=iec --suffix=B --format='%.1f' "$1" 2>/dev/null || echo "$1 bytes"
}

# fill_wheelhouse NAME DOCKERFILE BASE: downloads every wheel the image installs into
# $WHEELHOUSE (pip download keeps the files already there); the build then installs offline
# from it (the Dockerfiles' WHEELHOUSE build arg). Needed because pip's HTTP cache (the
# Dockerfiles' cache mount) stores nothing when a proxy strips PyPI's caching headers, as
# this machine's egress proxy does. The list comes from the Dockerfile's `requirements` stage.
fill_wheelhouse() {
  local name=$1 dockerfile=$2 base=$3 iid stamp
  mkdir -p "$WHEELHOUSE" "$LOG_DIR"
  iid=$(podman build -q --runtime "$RUNTIME" "${ULIMITS[@]}" --layers --target requirements \
          -f "$root/$dockerfile" --ignorefile "$root/$dockerfile.dockerignore" \
          --build-arg "BASE_IMAGE=$base" "$root") || die "$name: requirements stage failed"
  # Skipped when this exact requirement set was downloaded before (a no-op pip download still
  # takes half a minute: index queries and reading GBs of wheels).
  stamp="$WHEELHOUSE/.complete-$name-$(podman run --rm --runtime "$RUNTIME" "${ULIMITS[@]}" "$iid" \
          sh -c 'cat requirements.txt constraints.txt 2>/dev/null; python3 -VV' | sha256sum | cut -c1-16)"
  if [ -s "$stamp" ] && (cd "$WHEELHOUSE" && xargs -r ls -d -- < "$stamp" >/dev/null 2>&1); then
    log "$name: wheelhouse already holds this requirement set ($WHEELHOUSE)"
    return 0
  fi
  log "$name: wheels for $(podman run --rm --runtime "$RUNTIME" "${ULIMITS[@]}" "$iid" \
        sh -c 'grep -c . requirements.txt') requirements -> $WHEELHOUSE"
  rm -f "$WHEELHOUSE/.complete-$name-"*
  run_logged "$name: wheelhouse" "$LOG_DIR/$name-wheels.log" \
    podman run --rm --runtime "$RUNTIME" "${ULIMITS[@]}" "${CA_MOUNT[@]}" -v "$WHEELHOUSE:/wheelhouse" "$iid" \
      sh -c 'python3 -m venv /tmp/venv && /tmp/venv/bin/pip download --progress-bar off -d /wheelhouse \
               -r requirements.txt $(test -f constraints.txt && echo -c constraints.txt)'
  # The stamp lists the files this set needs, so a pruned wheelhouse is noticed.
  grep -oE '/wheelhouse/[^ ]+\.(whl|tar\.gz|zip)' "$LOG_DIR/$name-wheels.log" | sed 's|^/wheelhouse/||' \
    | sort -u > "$stamp.tmp"
  mv "$stamp.tmp" "$stamp"
  log "$name: wheelhouse holds $(du -sh "$WHEELHOUSE" | cut -f1)"
}

# build_image NAME DOCKERFILE IMAGE BASE: `podman build` from the repository root, context
# filtered by <DOCKERFILE>.dockerignore. BASE "upstream" keeps the Dockerfile's default.
build_image() {
  local name=$1 dockerfile=$2 image=$3 base=$4 t0=$SECONDS old_id
  local args=(build --runtime "$RUNTIME" "${ULIMITS[@]}" --layers
              -f "$root/$dockerfile" --ignorefile "$root/$dockerfile.dockerignore"
              --build-arg "VERSION=$(project_version)" --build-arg "REVISION=$(revision)"
              -t "$image")
  if [ "$base" = upstream ]; then
    log "$name: base = the Dockerfile's pinned upstream image"
  else
    [ "$base" != "$LOCAL_BASE_IMAGE" ] || build_base
    args+=(--build-arg "BASE_IMAGE=$base")
    log "$name: base = $base"
  fi
  args+=("${CA_MOUNT[@]}")
  if [ "$base" != upstream ] && [ -n "$WHEELHOUSE" ]; then
    fill_wheelhouse "$name" "$dockerfile" "$base"
    # /mnt exists in every base image: mounting there leaves no mount point behind.
    args+=(-v "$WHEELHOUSE:/mnt:ro" --build-arg WHEELHOUSE=/mnt)
  fi
  # shellcheck disable=SC2206
  args+=(${PODMAN_BUILD_ARGS:-} "$root")
  mkdir -p "$LOG_DIR"
  log "$name: podman build -> $image (log: $LOG_DIR/$name.log)"
  old_id=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
  run_logged "$name" "$LOG_DIR/$name.log" podman "${args[@]}"
  # The image this tag named before (GBs for the trainer) goes, unless something still uses it.
  if [ -n "$old_id" ] && [ "$old_id" != "$(podman image inspect --format '{{.Id}}' "$image")" ]; then
    podman rmi "$old_id" >/dev/null 2>&1 || true
  fi
  log "$name: $image built in $((SECONDS - t0))s, size $(human_size "$(podman image inspect --format '{{.Size}}' "$image")")"
  built+=("$image")
}

BUILD_CA_BUNDLE=${BUILD_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
WHEELHOUSE=${WHEELHOUSE-$BUILD_CACHE_DIR/wheels}
# The host's CA bundle (egress proxies, private mirrors) for pip in the RUN steps: a mount
# over the base's own bundle, never stored in the image.
CA_MOUNT=()
if [ -n "$BUILD_CA_BUNDLE" ] && [ -f "$BUILD_CA_BUNDLE" ]; then
  CA_MOUNT=(-v "$BUILD_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
fi
built=()
base_done=
install_tools
# One build at a time per machine (they share the wheelhouse and the image store).
exec 9>"${TMPDIR:-/tmp}/finetune-build-images.lock"
flock 9
case "$what" in
  base) build_base; built+=("$LOCAL_BASE_IMAGE") ;;
  operator) build_image operator Dockerfile "$OPERATOR_IMG" "$OPERATOR_BASE_IMAGE" ;;
  trainer) build_image trainer trainer-image/Dockerfile "$TRAINER_IMG" "$TRAINER_BASE_IMAGE" ;;
  all)
    build_image operator Dockerfile "$OPERATOR_IMG" "$OPERATOR_BASE_IMAGE"
    build_image trainer trainer-image/Dockerfile "$TRAINER_IMG" "$TRAINER_BASE_IMAGE"
    ;;
  *) die "unknown target: $what (base|operator|trainer|all)" ;;
esac
for image in "${built[@]}"; do
  log "$image: $(human_size "$(podman image inspect --format '{{.Size}}' "$image")")"
done
printf '%s\n' "${built[@]}"
