#!/usr/bin/env bash
# A local Kubernetes 1.20 cluster in network namespaces of its own: one control plane, N worker nodes.
#
#   deploy/cluster/local-cluster.sh up STATE [NODES] [IMAGE...]  # start (default 3 nodes) with these images of this
#                                                        # machine's engine in every node's; writes STATE/kubeconfig, env
#   deploy/cluster/local-cluster.sh load STATE IMAGE...  # docker save | load of images into every node's engine
#   deploy/cluster/local-cluster.sh kill-node STATE N    # every process of node N killed at once (a lost node)
#   deploy/cluster/local-cluster.sh down STATE           # stop and remove everything `up` made
#
# `up` removes what it made when it fails half-way. The binaries come from build.sh (built once, cached).
#
# Layout (S: a free slot 1-15, so two clusters can run side by side; every address is in 198.18.0.0/15):
#   namespace sgk<S>-cp    etcd on its loopback, kube-apiserver on 198.18.S.1:6443, controller-manager,
#                          scheduler; the bridge sgk-br joining every node and this machine (198.18.S.254)
#   namespace sgk<S>-n<K>  node K: 198.18.S.(10+K) on eth0, its own dockerd and kubelet; pods get addresses
#                          198.19.(16S+K).0/24 on a CNI bridge (Debian's containernetworking-plugins), with
#                          static routes to the other nodes' pod ranges. No default route anywhere in them.
#   this machine           one veth end on the bridge, 198.18.S.254/24, and a route per pod range, so the tests
#                          reach pods and the API directly; nothing else is routed.
# Each node's processes (kubelet, dockerd, containerd, shims, containers) sit in one freezer cgroup, so a node
# can be lost at once: frozen, every process SIGKILLed, thawed.
#
# Images given to `up` are seeded into each node's engine before it starts by hard-linking their layers from
# this machine's engine (overlay2, the same filesystem; image layers are never written to, containers write
# to layers of their own): the production image with its CUDA torch is 6.6 GB, and `docker save | load`
# took 6.5 minutes per node on two busy cores, against seconds for the links. Where that cannot be done
# (another storage driver or filesystem), `up` falls back to `load`.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
TOKEN="segserve-local-cluster-token"

log() { echo "[cluster $(date -u +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- helpers ------------------------------------------------------------------------------------------------
in_ns() { local ns="$1"; shift; nsenter --net="/var/run/netns/$ns" "$@"; }

# start NAME CGROUP NS COMMAND...: runs COMMAND in namespace NS (and cgroup CGROUP, when not "-"), detached,
# output to STATE/logs/NAME.log, pid to STATE/pids/NAME.
start() {
  local name="$1" cgroup="$2" ns="$3"; shift 3
  local script='[ "$1" = - ] || echo $$ >"$1/cgroup.procs"; shift; exec nsenter --net="/var/run/netns/$0" "$@"'
  setsid bash -c "$script" "$ns" "$cgroup" "$@" </dev/null >"$STATE/logs/$name.log" 2>&1 &
  echo $! >"$STATE/pids/$name"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds="$1" what="$2"; shift 2
  local deadline=$(($(date +%s) + seconds))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || die "$what: not after $seconds s"
    sleep 0.5
  done
}

kctl() { "$BIN/kubectl" --kubeconfig "$STATE/kubeconfig" "$@"; }

load_env() {
  [ -f "$STATE/env" ] || die "$STATE/env missing: no cluster there"
  # shellcheck disable=SC1091
  . "$STATE/env"
}

kubeconfig() {  # kubeconfig SERVER USER
  cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: $1
    insecure-skip-tls-verify: true
users:
- name: $2
  user:
    token: $TOKEN
contexts:
- name: local
  context: {cluster: local, user: $2, namespace: default}
current-context: local
EOF
}

# ---- up -----------------------------------------------------------------------------------------------------
free_slot() {
  local s
  for s in $(seq 1 15); do
    if [ ! -e "/var/run/netns/sgk$s-cp" ] && ! ip -o addr | grep -q " 198\.18\.$s\."; then
      echo "$s"
      return
    fi
  done
  die "no free slot (15 clusters already?)"
}

cmd_up() {
  local nodes="${1:-3}"
  shift || true
  IMAGES=("$@")
  [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, mounts, engines)"
  [ "$nodes" -ge 1 ] && [ "$nodes" -le 9 ] || die "NODES must be 1-9"
  [ ! -e "$STATE/env" ] || die "$STATE already holds a cluster; run down first"
  local t0
  t0=$(date +%s)
  BIN="$("$HERE/build.sh")/bin"
  CNI_BIN="$(dirname "$BIN")/cni"
  mkdir -p "$STATE"/{logs,pids}
  local S
  S="$(free_slot)"
  # Short paths for unix sockets (108 bytes at most) under /run; bulky data (image layers) under STATE.
  local RUNDIR="/run/sgk$S"
  cat >"$STATE/env" <<EOF
SLOT=$S
NODES=$nodes
BIN=$BIN
CNI_BIN=$CNI_BIN
RUNDIR=$RUNDIR
API_SERVER=https://198.18.$S.1:6443
HOST_ADDRESS=198.18.$S.254
KUBECONFIG=$STATE/kubeconfig
EOF
  load_env
  trap 'log "start-up failed; removing what was made"; cmd_down || true; exit 1' ERR
  mkdir -p "$RUNDIR" /var/run/netns /var/lib/kubelet
  local freezer=/sys/fs/cgroup/freezer
  [ -d "$freezer" ] || die "no freezer cgroup hierarchy at $freezer (cgroup v1 needed)"

  # -- the network: control-plane namespace with the bridge, this machine's end -----------------------------
  local cp="sgk$S-cp"
  ip netns add "$cp"
  in_ns "$cp" ip link set lo up
  in_ns "$cp" ip link add sgk-br type bridge
  in_ns "$cp" ip addr add "198.18.$S.1/24" dev sgk-br
  in_ns "$cp" ip link set sgk-br up
  ip link add "sgk$S-host" type veth peer name host0 netns "$cp"
  in_ns "$cp" ip link set host0 master sgk-br up
  ip addr add "198.18.$S.254/24" dev "sgk$S-host"
  ip link set "sgk$S-host" up

  # -- control plane ----------------------------------------------------------------------------------------
  local C="$STATE/cp"
  mkdir -p "$C/etcd" "$C/pki" "$C/flex"
  echo "$TOKEN,admin,admin,system:masters" >"$C/tokens.csv"
  openssl genrsa -out "$C/pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$C/pki/sa.key" -pubout -out "$C/pki/sa.pub" 2>/dev/null
  kubeconfig "https://198.18.$S.1:6443" admin >"$STATE/kubeconfig"
  start etcd - "$cp" "$BIN/etcd" --data-dir "$C/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster default=http://127.0.0.1:2380
  start kube-apiserver - "$cp" "$BIN/kube-apiserver" --etcd-servers http://127.0.0.1:2379 \
    --bind-address "198.18.$S.1" --advertise-address "198.18.$S.1" --secure-port 6443 --insecure-port 0 \
    --cert-dir "$C/pki" --token-auth-file "$C/tokens.csv" --authorization-mode AlwaysAllow \
    --service-cluster-ip-range "198.18.$((128 + S)).0/24" --disable-admission-plugins ServiceAccount \
    --service-account-key-file "$C/pki/sa.pub" --service-account-signing-key-file "$C/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --default-not-ready-toleration-seconds 5 --default-unreachable-toleration-seconds 5
  wait_for 90 "kube-apiserver ready" kctl get --raw /readyz
  kubeconfig "https://198.18.$S.1:6443" admin >"$C/kubeconfig"
  start kube-scheduler - "$cp" "$BIN/kube-scheduler" --kubeconfig "$C/kubeconfig" --leader-elect=false \
    --bind-address 127.0.0.1 --port 0
  log "control plane up after $(($(date +%s) - t0)) s"

  # -- nodes ------------------------------------------------------------------------------------------------
  local k
  for k in $(seq 1 "$nodes"); do start_node "$k"; done
  for k in $(seq 1 "$nodes"); do
    wait_for 120 "node sgk$S-n$k Ready" bash -c \
      "'$BIN/kubectl' --kubeconfig '$STATE/kubeconfig' get node sgk$S-n$k -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
  done
  # The controller-manager only once every node is Ready: started while they were all still NotReady, its
  # node lifecycle controller can enter its full-disruption mode and then never evict from a lost node.
  start kube-controller-manager - "$cp" "$BIN/kube-controller-manager" --kubeconfig "$C/kubeconfig" \
    --leader-elect=false --bind-address 127.0.0.1 --port 0 --flex-volume-plugin-dir "$C/flex" \
    --service-account-private-key-file "$C/pki/sa.key" --use-service-account-credentials=false \
    --node-monitor-period 2s --node-monitor-grace-period 16s --controllers '*,-serviceaccount-token'
  wait_for 60 "the default service account" kctl get serviceaccount default
  trap - ERR
  log "cluster up with $nodes nodes after $(($(date +%s) - t0)) s (KUBECONFIG=$STATE/kubeconfig)"
}

start_node() {
  local k="$1" S="$SLOT"
  local name="sgk$S-n$k" cp="sgk$S-cp" N="$STATE/n$k" R="/run/sgk$S/n$k"
  local address="198.18.$S.$((10 + k))" pods="198.19.$((16 * S + k))"
  mkdir -p "$N"/{docker,kubelet,var-lib-kubelet,varlog,cni-conf,cni-cache,cni-ipam,pause} "$R"
  local seeded=1
  if [ ${#IMAGES[@]} -gt 0 ] && ! seed_images "$N/docker" "${IMAGES[@]}"; then
    seeded=0
    rm -rf "${N:?}/docker" && mkdir "$N/docker"  # nothing half-seeded for the engine to trip on
  fi
  ip netns add "$name"
  in_ns "$name" ip link set lo up
  ip link add "sgk$S-n$k" type veth peer name eth0 netns "$name"
  ip link set "sgk$S-n$k" netns "$cp"
  in_ns "$cp" ip link set "sgk$S-n$k" master sgk-br up
  in_ns "$name" ip addr add "$address/24" dev eth0
  in_ns "$name" ip link set eth0 up
  in_ns "$name" sysctl -qw net.ipv4.ip_forward=1  # this namespace's own setting: it routes its pods
  local j
  for j in $(seq 1 "$NODES"); do
    [ "$j" = "$k" ] || in_ns "$name" ip route add "198.19.$((16 * S + j)).0/24" via "198.18.$S.$((10 + j))"
  done
  ip route add "$pods.0/24" via "$address" dev "sgk$S-host"

  # One freezer cgroup holds the node's processes; dockerd puts its containers below it too.
  local cg="/sys/fs/cgroup/freezer/$name"
  mkdir -p "$cg"
  start "$name-dockerd" "$cg" "$name" dockerd --bridge=none --iptables=false --ip6tables=false \
    --data-root "$N/docker" --exec-root "$R/d" -H "unix://$R/docker.sock" --pidfile "$R/docker.pid" \
    --cgroup-parent "/$name" --oom-score-adjust 0 --log-level warn
  wait_for 60 "$name dockerd" docker -H "unix://$R/docker.sock" info
  # The pod sandbox image: upstream's pause.c, built with the binaries.
  cp "$BIN/pause" "$N/pause/pause"
  tar -C "$N/pause" -c pause | docker -H "unix://$R/docker.sock" import --change 'ENTRYPOINT ["/pause"]' \
    - segserve-local/pause:1.20 >/dev/null
  if [ "$seeded" = 0 ]; then
    log "$name: seeding the images failed; docker save | load instead"
    local image
    for image in "${IMAGES[@]}"; do docker save "$image" | docker -H "unix://$R/docker.sock" load -q >/dev/null; done
  fi
  for image in "${IMAGES[@]}"; do docker -H "unix://$R/docker.sock" image inspect "$image" >/dev/null; done

  cat >"$N/cni-conf/10-segserve.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "segserve-local",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$pods.0/24", "gateway": "$pods.1"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$N/cni-ipam"}}
  ]
}
EOF
  cat >"$N/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $address
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
oomScoreAdj: 0
resolvConf: ""
nodeStatusUpdateFrequency: 2s
nodeLeaseDurationSeconds: 8
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
  kubeconfig "https://198.18.$S.1:6443" "system:node:$name" >"$N/kubeconfig"
  # A private mount namespace: /var/log and /var/lib/kubelet (1.20 hard-codes device-plugins/kubelet.sock
  # there) are this node's own folders. The root dir is a real path, the same for the node's dockerd,
  # which runs in this machine's mount namespace and bind-mounts the pods' volumes from it.
  local script="mount --bind '$N/varlog' /var/log && mount --bind '$N/var-lib-kubelet' /var/lib/kubelet && exec \"\$@\""
  start "$name-kubelet" "$cg" "$name" unshare -m --propagation private bash -c "$script" kubelet \
    "$BIN/kubelet" --config "$N/kubelet.yaml" --kubeconfig "$N/kubeconfig" --root-dir "$N/kubelet" \
    --hostname-override "$name" --node-ip "$address" --container-runtime docker \
    --docker-endpoint "unix://$R/docker.sock" --container-runtime-endpoint "unix://$R/dockershim.sock" \
    --image-service-endpoint "unix://$R/dockershim.sock" --docker "unix://$R/docker.sock" --docker-root "$N/docker" \
    --pod-infra-container-image segserve-local/pause:1.20 --network-plugin cni --cni-conf-dir "$N/cni-conf" \
    --cni-bin-dir "$CNI_BIN" --cni-cache-dir "$N/cni-cache" --node-labels "segserve.local/node=n$k"
}

# ---- images -------------------------------------------------------------------------------------------------
# seed_images DATA_ROOT IMAGE...: a node engine's data root (not yet started) made to hold these images of this
# machine's engine, by hard links to their layers and copies of their metadata.
seed_images() {
  local root="$1"; shift
  local host driver
  host="$(docker info -f '{{.DockerRootDir}}')"
  driver="$(docker info -f '{{.Driver}}')"
  [ "$driver" = overlay2 ] || { log "this machine's engine uses $driver, not overlay2"; return 1; }
  [ "$(stat -c %d "$host")" = "$(stat -c %d "$root")" ] || { log "$host and $root are on different filesystems"; return 1; }
  local meta="$root/image/overlay2" hmeta="$host/image/overlay2"
  mkdir -p "$meta/imagedb/content/sha256" "$meta/imagedb/metadata/sha256" "$meta/layerdb/sha256" "$root/overlay2/l"
  local repositories="{" image id chain diff cache first=1 caches=()
  for image in "$@"; do
    id="$(docker image inspect -f '{{.Id}}' "$image")" || return 1
    cp "$hmeta/imagedb/content/sha256/${id#sha256:}" "$meta/imagedb/content/sha256/"
    chain=""
    for diff in $(docker image inspect -f '{{range .RootFS.Layers}}{{println .}}{{end}}' "$image"); do
      if [ -z "$chain" ]; then chain="$diff"; else chain="sha256:$(printf '%s %s' "$chain" "$diff" | sha256sum | cut -c1-64)"; fi
      [ -d "$meta/layerdb/sha256/${chain#sha256:}" ] && continue
      cp -a "$hmeta/layerdb/sha256/${chain#sha256:}" "$meta/layerdb/sha256/" || return 1
      caches+=("$(cat "$meta/layerdb/sha256/${chain#sha256:}/cache-id")")
    done
    [ "$first" = 1 ] || repositories+=","
    first=0
    repositories+="\"${image%:*}\":{\"$image\":\"$id\"}"
  done
  # Hard links cannot cross mount points, and the engine's root is often one of its own (a bind mount of a
  # folder of the same filesystem): link through a private, non-recursive bind mount of / instead.
  local view
  view="$(mktemp -d /run/sgk-seed.XXXXXX)"
  unshare -m --propagation private bash -c 'set -e; mount --bind / "$0"; host="$1" root="$2"; shift 2
    for cache in "$@"; do cp -al "$0$host/overlay2/$cache" "$0$root/overlay2/"; done' \
    "$view" "$(realpath "$host")" "$(realpath "$root")" "${caches[@]}" || { rmdir "$view"; return 1; }
  rmdir "$view"
  for cache in "${caches[@]}"; do ln -sfn "../$cache/diff" "$root/overlay2/l/$(cat "$root/overlay2/$cache/link")"; done
  echo "$repositories}" | sed 's/^{/{"Repositories":{/; s/$/}/' >"$meta/repositories.json"
}

# ---- load ---------------------------------------------------------------------------------------------------
cmd_load() {
  load_env
  local image tar k
  for image in "$@"; do
    tar="$STATE/image-$(echo "$image" | tr -c 'a-zA-Z0-9.\n' _).tar"
    docker save "$image" -o "$tar"
    for k in $(seq 1 "$NODES"); do
      [ -e "/var/run/netns/sgk$SLOT-n$k" ] || continue
      docker -H "unix://$RUNDIR/n$k/docker.sock" load -q -i "$tar" >/dev/null
    done
    rm -f "$tar"
    log "loaded $image into $NODES nodes"
  done
}

# ---- kill-node ----------------------------------------------------------------------------------------------
kill_cgroup() {  # freeze, SIGKILL every process, thaw: nothing of it runs on after the first is killed
  local cg="$1"
  [ -d "$cg" ] || return 0
  echo FROZEN >"$cg/freezer.state" 2>/dev/null || true
  local pid
  for pid in $(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  echo THAWED >"$cg/freezer.state" 2>/dev/null || true
  local _
  for _ in $(seq 50); do
    [ -z "$(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null)" ] && break
    sleep 0.1
  done
}

cmd_kill_node() {
  load_env
  local k="$1"
  kill_cgroup "/sys/fs/cgroup/freezer/sgk$SLOT-n$k"
  log "node sgk$SLOT-n$k: every process killed"
}

# ---- down ---------------------------------------------------------------------------------------------------
stop_pid() {  # stop_pid FILE SIGNAL: the process group started by `start`
  local file="$1" signal="$2" pid
  [ -f "$file" ] || return 0
  pid="$(cat "$file")"
  kill "-$signal" -- "-$pid" 2>/dev/null || kill "-$signal" "$pid" 2>/dev/null || true
}

cmd_down() {
  [ -f "$STATE/env" ] || { log "nothing at $STATE"; return 0; }
  . "$STATE/env"
  local S="$SLOT" k
  for name in kube-controller-manager kube-scheduler; do stop_pid "$STATE/pids/$name" KILL; done
  for k in $(seq 1 "$NODES"); do
    stop_pid "$STATE/pids/sgk$S-n$k-kubelet" KILL
    kill_cgroup "/sys/fs/cgroup/freezer/sgk$S-n$k"  # containers, shims, containerd, dockerd
  done
  for name in kube-apiserver etcd; do stop_pid "$STATE/pids/$name" KILL; done
  sleep 0.5
  # Mounts left by the engines and the kubelets (overlay layers, shm, netns bind mounts), deepest first.
  local point
  for point in $(awk '{print $2}' /proc/mounts | grep -E "^($STATE|$RUNDIR)(/|$)" | sort -r); do
    umount -l "$point" 2>/dev/null || true
  done
  for k in $(seq 1 "$NODES"); do
    local cg="/sys/fs/cgroup/freezer/sgk$S-n$k"
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
    # docker's --cgroup-parent made this node's folder in every other hierarchy too
    for h in /sys/fs/cgroup/*/; do
      [ -d "$h/sgk$S-n$k" ] && find "$h/sgk$S-n$k" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
    ip route del "198.19.$((16 * S + k)).0/24" 2>/dev/null || true
    ip netns del "sgk$S-n$k" 2>/dev/null || true
  done
  ip link del "sgk$S-host" 2>/dev/null || true
  ip netns del "sgk$S-cp" 2>/dev/null || true
  rm -rf "$RUNDIR"
  # Everything under STATE goes, the cluster's data and logs with it, unless asked to keep the logs.
  if [ "${SEGSERVE_CLUSTER_KEEP_LOGS:-}" ]; then
    find "$STATE" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
  else
    rm -rf "$STATE"
  fi
  log "cluster in slot $S removed"
}

# ---- main ---------------------------------------------------------------------------------------------------
[ $# -ge 2 ] || { sed -n '2,8p' "$0" >&2; exit 2; }
command="$1"
STATE="$(realpath -m "$2")"
shift 2
case "$command" in
  up) cmd_up "$@" ;;
  load) cmd_load "$@" ;;
  kill-node) cmd_kill_node "$@" ;;
  down) cmd_down ;;
  *) die "unknown command $command" ;;
esac
