#!/usr/bin/env bash
# Builds the local test cluster's Kubernetes 1.20.2 once, from Debian bookworm's packages only, and caches it.
#
#   deploy/cluster/build.sh            # prints the folder holding bin/ (builds it first when missing)
#
# Why this way: no registry or release download can be reached here, and Debian builds only kubectl from its
# `kubernetes` source package (1.20.5+really1.20.2, the full upstream tree with vendor/). This script fetches
# that source with a private apt configuration (its own sources with deb-src lines, lists and cache: the
# machine's apt is not touched), Debian's Go 1.19 (unpacked, not installed), and builds kube-apiserver,
# kube-controller-manager, kube-scheduler and kubelet in GOPATH mode, after generating the OpenAPI
# definitions `make` would. etcd (etcd-server 3.4), kubectl (kubernetes-client, the same 1.20.2) and the CNI
# plugins (containernetworking-plugins) are Debian's binaries, unpacked. patches/ holds the sandbox's changes
# to the kubelet, one line each, with their reasons.
#
# The result lives in $SEGSERVE_K8S_CACHE (default /var/cache/segserve-k8s), outside any clone, under a name
# made of the version and a hash of the patches and of the recipe's revision, so every clone and CI run on this machine
# reuses it and any change to them builds afresh. About 20-30 min on 2 busy cores; the Go cache takes 1.6 GB.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
K8S_VERSION="v1.20.2"
CACHE="${SEGSERVE_K8S_CACHE:-/var/cache/segserve-k8s}"
JOBS="${SEGSERVE_K8S_BUILD_JOBS:-2}"
# Bump RECIPE when a change to this script changes what it builds (comments and logging do not).
RECIPE=1
KEY="$( (echo "$DEB_VERSION recipe $RECIPE"; cat "$HERE"/patches/*.patch) | sha256sum | cut -c1-12)"
OUT="$CACHE/kubernetes-${K8S_VERSION}-${KEY}"

log() { echo "[build $(date -u +%H:%M:%S)] $*" >&2; }

if [ -f "$OUT/.complete" ]; then
  echo "$OUT"
  exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/build.lock"
log "waiting for $CACHE/build.lock"
flock 9
if [ -f "$OUT/.complete" ]; then  # built by another process while this one waited
  echo "$OUT"
  exit 0
fi
started=$(date +%s)

# ---- the machine's own tools: docker.io (the nodes' engines), gcc for the pause binary ----------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v gcc >/dev/null || missing+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || [ -f /usr/lib/aarch64-linux-gnu/libc.a ] || missing+=(libc6-dev)
command -v nsenter >/dev/null || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
command -v dpkg-source >/dev/null || missing+=(dpkg-dev)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# ---- a private apt configuration: the machine's mirror and suites, plus deb-src -----------------------------
APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/etc"
# The same mirrors and suites the machine uses (deb822 or one-line sources), each also as deb-src.
mirrors="$(grep -hoE 'https?://[^ ]+/debian(-security)?/?' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
  /etc/apt/sources.list.d/*.list 2>/dev/null | sed 's|/$||' | sort -u || true)"
# sed -n 1p, not head -1: head exits at its first line, and under pipefail a writer it leaves behind dies of
# SIGPIPE (exit 141), which set -e takes for a failure.
main_mirror="$(echo "$mirrors" | grep -E '/debian$' | sed -n 1p || true)"
security_mirror="$(echo "$mirrors" | grep -E '/debian-security$' | sed -n 1p || true)"
main_mirror="${main_mirror:-http://deb.debian.org/debian}"
security_mirror="${security_mirror:-http://deb.debian.org/debian-security}"
{
  for suite in bookworm bookworm-updates; do
    echo "deb $main_mirror $suite main"
    echo "deb-src $main_mirror $suite main"
  done
  echo "deb $security_mirror bookworm-security main"
  echo "deb-src $security_mirror bookworm-security main"
} >"$APT/etc/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$APT/etc/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o Debug::NoLocking=1
  -o APT::Sandbox::User=root)
log "apt update (private configuration in $APT)"
apt-get "${apt_opts[@]}" update -qq

# ---- Debian's binaries, unpacked: Go 1.19, etcd, kubectl, CNI plugins ----------------------------------------
DEBS="$CACHE/debs"
mkdir -p "$DEBS"
(cd "$DEBS" && apt-get "${apt_opts[@]}" download -qq golang-1.19-go golang-1.19-src etcd-server \
  "kubernetes-client=$DEB_VERSION" containernetworking-plugins)
GOROOT_BASE="$CACHE/go-1.19"
if [ ! -x "$GOROOT_BASE/usr/lib/go-1.19/bin/go" ]; then
  rm -rf "$GOROOT_BASE"
  for deb in "$DEBS"/golang-1.19-go_*.deb "$DEBS"/golang-1.19-src_*.deb; do dpkg-deb -x "$deb" "$GOROOT_BASE"; done
fi
export GOROOT="$GOROOT_BASE/usr/lib/go-1.19"
export PATH="$GOROOT/bin:$PATH"
log "$(go version)"

# ---- the source, patched ------------------------------------------------------------------------------------
WORK="$CACHE/work-$KEY"
export GOPATH="$WORK/gopath"
TREE="$GOPATH/src/k8s.io/kubernetes"
if [ ! -f "$TREE/.segserve-patched" ]; then
  rm -rf "$WORK"
  mkdir -p "$WORK/src" "$(dirname "$TREE")"
  log "apt-get source kubernetes=$DEB_VERSION"
  (cd "$WORK/src" && apt-get "${apt_opts[@]}" source -qq "kubernetes=$DEB_VERSION" >/dev/null)
  mv "$WORK/src/kubernetes-1.20.5+really1.20.2" "$TREE"
  for p in "$HERE"/patches/*.patch; do
    log "patch $(basename "$p")"
    patch -d "$TREE" -p1 --forward --quiet <"$p"
  done
  touch "$TREE/.segserve-patched"
fi

# GOPATH mode: module mode fails on this tree ("updates to go.mod needed, disabled by -mod=vendor").
export GO111MODULE=off GOFLAGS= GOPROXY=off CGO_ENABLED=0
export GOCACHE="$CACHE/gocache"
cd "$TREE"

# ---- generated OpenAPI definitions (what `make gen_openapi` does; kube-apiserver needs them) -----------------
OPENAPI_OUT=pkg/generated/openapi/zz_generated.openapi.go
if [ ! -f "$OPENAPI_OUT" ]; then
  log "openapi-gen"
  go build -p "$JOBS" -o "$WORK/openapi-gen" k8s.io/kubernetes/vendor/k8s.io/kube-openapi/cmd/openapi-gen
  # The same selection as Makefile.generated_files: every directory whose Go files carry +k8s:openapi-gen=,
  # code-generator's and sample-apiserver's examples excepted.
  hack/make-rules/helpers/cache_go_dirs.sh "$WORK/all_go_dirs" >/dev/null
  dirs="$(find $(cat "$WORK/all_go_dirs") -maxdepth 1 -type f -name '*.go' 2>/dev/null \
    | xargs grep --color=never -l '^// *+k8s:' | xargs grep --color=never -l '+k8s:openapi-gen=' \
    | grep -vE '^vendor/k8s.io/(code-generator|sample-apiserver)/' | xargs -n1 dirname | LC_ALL=C sort -u \
    | sed 's|^|k8s.io/kubernetes/|' | paste -sd,)"
  "$WORK/openapi-gen" --logtostderr -i "$dirs" -p k8s.io/kubernetes/pkg/generated/openapi \
    -O zz_generated.openapi -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
    -r "$WORK/openapi_violations.report" -o "$GOPATH/src"
  # The generator's API-rule report equals upstream's list of known exceptions when the selection is right.
  diff -q "$WORK/openapi_violations.report" api/api-rules/violation_exceptions.list >/dev/null \
    || log "note: the OpenAPI rule report differs from api/api-rules/violation_exceptions.list"
  test -f "$OPENAPI_OUT"
fi

# ---- the binaries -------------------------------------------------------------------------------------------
pkg=k8s.io/kubernetes/vendor/k8s.io
ldflags="-s -w"
for v in "gitVersion=$K8S_VERSION" gitMajor=1 gitMinor=20 gitTreeState=archive \
  gitCommit=faecb196815e248d3ecfb03c680a4507229c2a56 "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
  ldflags+=" -X $pkg/component-base/version.$v -X $pkg/client-go/pkg/version.$v"
done
mkdir -p "$WORK/bin"
for cmd in kube-scheduler kubelet kube-controller-manager kube-apiserver; do
  if [ ! -x "$WORK/bin/$cmd" ]; then
    t0=$(date +%s)
    log "go build $cmd (-p $JOBS)"
    go build -p "$JOBS" -ldflags "$ldflags" -o "$WORK/bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
    mv "$WORK/bin/$cmd.tmp" "$WORK/bin/$cmd"
    log "$cmd built in $(($(date +%s) - t0)) s"
  fi
done

# ---- the pause binary (the pod sandbox image is made from it when a node starts) ------------------------------
gcc -Os -static -DVERSION=segserve -o "$WORK/bin/pause" build/pause/linux/pause.c

# ---- assemble -----------------------------------------------------------------------------------------------
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp/bin" "$OUT.tmp/cni"
cp "$WORK"/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,pause} "$OUT.tmp/bin/"
x="$WORK/x"
rm -rf "$x"
for deb in "$DEBS"/etcd-server_*.deb "$DEBS"/kubernetes-client_*.deb "$DEBS"/containernetworking-plugins_*.deb; do
  dpkg-deb -x "$deb" "$x"
done
cp "$x/usr/bin/etcd" "$x/usr/bin/kubectl" "$OUT.tmp/bin/"
cp "$x"/usr/lib/cni/* "$OUT.tmp/cni/"
rm -rf "$x"
(cd "$OUT.tmp/bin" && ./kube-apiserver --version && ./kubelet --version && ./kubectl version --client --short \
  && ./etcd --version | sed -n 1p) >&2  # not head -1: etcd still writing when head exits is SIGPIPE, exit 141
echo "built $(date -u +%FT%TZ) in $(($(date +%s) - started)) s from kubernetes $DEB_VERSION" >"$OUT.tmp/BUILD-INFO"
mv "$OUT.tmp" "$OUT"
touch "$OUT/.complete"
# The tree and the Go cache stay for a rebuild with other patches; the binaries are all that is used.
log "done in $(($(date +%s) - started)) s: $OUT"
echo "$OUT"
