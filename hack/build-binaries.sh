#!/usr/bin/env bash
# Builds helm, actionlint, etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, kueue,
# kstatus, kubelet, the
# real node's pause and fake-gpu-plugin programs and its CoreDNS from
# the pinned wrapper modules in hack/build/*. Binaries land in a cache keyed by the
# wrapper's go.mod+go.sum, so a rebuild happens only when a pinned version changes.
# `build-binaries.sh tools` builds only helm, actionlint and kstatus; `build-binaries.sh minio` only
# MinIO (hack/build/minio: an S3-compatible server for the trainer's push tests).
# Prints the directory holding the binaries on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${FINETUNE_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-testbin}
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

K8S_VERSION=v1.37.2
# A module's own Go sources (only the node module has any) are part of its key.
key() { (cd "$here/build/$1" && cat go.mod go.sum $(find . -name '*.go' | sort)) | sha256sum | cut -c1-12; }

log() { printf '[build-binaries %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

heartbeat() {  # name, start, verbose log: packages compiled so far, elapsed time
  local n sp
  # The trap ends the pending sleep too, so no child keeps the caller's pipes open.
  trap 'kill $sp 2>/dev/null; exit 0' TERM
  while :; do
    sleep "${PROGRESS_EVERY:-30}" & sp=$!; wait "$sp"
    n=$(grep -c '^[^ ]*$' "$3" 2>/dev/null || true)
    log "$1: still building, $((SECONDS - $2)) s elapsed, ${n:-0} packages compiled (last: $(tail -n1 "$3" 2>/dev/null))"
  done
}

build_component() {  # name, output dir, packages... (MODULE: wrapper dir, default name)
  local name=$1 out=$2; shift 2
  if [ -f "$out/.complete" ]; then log "$name: cached in $out"; return; fi
  log "$name: building (cold: minutes on 2 cores; progress every ${PROGRESS_EVERY:-30} s)"
  local start=$SECONDS tmp="$out.tmp.$$" rc=0
  rm -rf "$tmp"; mkdir -p "$tmp"
  # go build -v names each package as it compiles it; a heartbeat counts them so a
  # cold Kubernetes build (12 to 14 minutes on 2 cores) is never silent.
  local vlog="$tmp.build.log"; : > "$vlog"
  heartbeat "$name" "$start" "$vlog" & local beat=$!
  (cd "$here/build/${MODULE:-$name}" && go build -v -trimpath -tags selinux,notest \
      -ldflags "-s -w ${LDFLAGS_EXTRA:-}" -o "$tmp/" "$@") 2>"$vlog" || rc=$?
  kill "$beat" 2>/dev/null; wait "$beat" 2>/dev/null || true
  if [ "$rc" != 0 ]; then
    log "$name: go build failed (exit $rc); its last lines:"; grep -v '^[^ ]*$' "$vlog" | tail -40 >&2
    exit "$rc"
  fi
  rm -f "$vlog"
  # go names a module's main package after its last path element ("server" for etcd,
  # "dns" for our CoreDNS wrapper).
  [ -f "$tmp/server" ] && mv "$tmp/server" "$tmp/etcd"
  [ -f "$tmp/dns" ] && mv "$tmp/dns" "$tmp/coredns"
  touch "$tmp/.complete"
  rm -rf "$out"; mv "$tmp" "$out"
  log "$name: built in $((SECONDS - start)) s"
}

version_flags() {
  local f="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=37"
    f+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=2026-01-01T00:00:00Z"
  done
  echo "$f"
}

link_all() {  # one stable directory of links, so callers need a single path
  bin="$cache_root/bin"; mkdir -p "$bin"
  for d in "${dirs[@]}"; do for f in "$d"/*; do ln -sfn "$f" "$bin/$(basename "$f")"; done; done
  echo "$bin"
}

dirs=()
# MinIO, an S3-compatible server (tests/trainer/test_push_s3.py pushes adapters to it).
# Only `build-binaries.sh minio` builds it (the cluster and the static checks need none).
if [ "${1:-}" = minio ]; then
  d="$cache_root/minio-$(key minio)"; build_component minio "$d" github.com/minio/minio; dirs+=("$d")
  link_all; exit 0
fi
# Helm, actionlint and kstatus (tests/static/test_chart.py, test_workflows.py,
# tests/unit/test_kstatus.py). `build-binaries.sh tools` builds only these three: those checks
# need no control plane.
d="$cache_root/helm-$(key helm)"
LDFLAGS_EXTRA="-X helm.sh/helm/v4/internal/version.version=$(awk '$1 == "helm.sh/helm/v4" {print $2}' "$here/build/helm/go.mod")" \
  build_component helm "$d" helm.sh/helm/v4/cmd/helm
dirs+=("$d")
d="$cache_root/actionlint-$(key actionlint)"
build_component actionlint "$d" github.com/rhysd/actionlint/cmd/actionlint; dirs+=("$d")
# kstatus's status.Compute (sigs.k8s.io/cli-utils) behind a stdin/stdout wrapper: the tests
# check the TrainingJob conditions against it (docs/CONTRACTS.md, "Conditions and kstatus").
d="$cache_root/kstatus-$(key kstatus)"; build_component kstatus "$d" .; dirs+=("$d")
if [ "${1:-}" = tools ]; then
  bin="$cache_root/bin"; mkdir -p "$bin"
  for d in "${dirs[@]}"; do for f in "$d"/*; do ln -sfn "$f" "$bin/$(basename "$f")"; done; done
  echo "$bin"; exit 0
fi
d="$cache_root/etcd-$(key etcd)"; build_component etcd "$d" go.etcd.io/etcd/server/v3; dirs+=("$d")
d="$cache_root/kwok-$(key kwok)"; build_component kwok "$d" sigs.k8s.io/kwok/cmd/kwok; dirs+=("$d")
# Kueue's manager (hack/finetune_testbed/kueue.py: `make cluster-up KUEUE=1`,
# tests/integration/test_kueue.py); FINETUNE_NO_KUEUE=1 skips it.
if [ "${FINETUNE_NO_KUEUE:-0}" != 1 ]; then
  d="$cache_root/kueue-$(key kueue)"; build_component kueue "$d" sigs.k8s.io/kueue/cmd/kueue; dirs+=("$d")
fi
d="$cache_root/k8s-$(key k8s)"
LDFLAGS_EXTRA=$(version_flags) build_component k8s "$d" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler
dirs+=("$d")
# The real node's kubelet (tests/e2e run trainer pods in containers under it). Same wrapper
# module, so it reuses the control plane's compiled packages; FINETUNE_NO_KUBELET=1 skips it.
if [ "${FINETUNE_NO_KUBELET:-0}" != 1 ]; then
  d="$cache_root/kubelet-$(key k8s)"
  MODULE=k8s LDFLAGS_EXTRA=$(version_flags) build_component kubelet "$d" k8s.io/kubernetes/cmd/kubelet
  dirs+=("$d")
  # The sandbox's pause process and a device plugin advertising nvidia.com/gpu (our own code).
  d="$cache_root/node-$(key node)"
  build_component node "$d" ./cmd/fake-gpu-plugin ./cmd/pause
  dirs+=("$d")
  # The node's cluster DNS: CoreDNS v1.15 with only the plugins its Corefile uses.
  d="$cache_root/coredns-$(key dns)"
  MODULE=dns build_component coredns "$d" .
  dirs+=("$d")
fi

# One stable directory of links, so callers need a single path.
bin="$cache_root/bin"; mkdir -p "$bin"
for d in "${dirs[@]}"; do for f in "$d"/*; do ln -sfn "$f" "$bin/$(basename "$f")"; done; done
echo "$bin"
