# shellcheck shell=bash
# Shared helpers for the local three-node cluster scripts (up, down, kill,
# start, status). Sourced, never run.
#
# Layout: node N listens on 127.0.0.N (API port 8500, peer port 8300, proxy
# port 8700 for HTTP routes; TCP routes on their listen_port) and
# keeps everything under cluster/data/: nodeN/ (data dir), nodeN.log,
# nodeN.pid. A pid is trusted only while /proc/PID/cmdline shows the
# raftmesh binary started with that node's data dir, so a stale pid file
# never makes a script signal an unrelated process.
#
# Environment: CLUSTER_TIMEOUT (seconds, default 30) bounds every wait;
# CARGO_TARGET_DIR is honoured when locating the binary; RUST_LOG is passed
# to the nodes.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA="$ROOT/cluster/data"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/dist/raftmesh"
NODE_IDS=(1 2 3)
API_PORT=8500
PEER_PORT=8300
PROXY_PORT=8700
CLUSTER_TIMEOUT=${CLUSTER_TIMEOUT:-30}
# Every HTTP call is bounded; a node that does not answer in time is "down"
# for that probe.
CURL=(curl -fsS --max-time 2)

info() { printf '%s\n' "$*"; }
warn() { printf '%s\n' "$*" >&2; }
die() {
  warn "error: $*"
  exit 1
}

node_ip() { printf '127.0.0.%s' "$1"; }
api_addr() { printf '%s:%s' "$(node_ip "$1")" "$API_PORT"; }
peer_addr() { printf '%s:%s' "$(node_ip "$1")" "$PEER_PORT"; }
proxy_addr() { printf '%s:%s' "$(node_ip "$1")" "$PROXY_PORT"; }
data_dir() { printf '%s/node%s' "$DATA" "$1"; }
log_file() { printf '%s/node%s.log' "$DATA" "$1"; }
pid_file() { printf '%s/node%s.pid' "$DATA" "$1"; }

# check_node N: die unless N names one of the cluster's nodes.
check_node() {
  local n=${1:-}
  local id
  for id in "${NODE_IDS[@]}"; do
    [[ $n == "$id" ]] && return 0
  done
  die "node must be one of: ${NODE_IDS[*]} (got '${n}')"
}

# join_list: API addresses of all nodes, comma-separated (a node skips its
# own address).
join_list() {
  local id out=()
  for id in "${NODE_IDS[@]}"; do
    out+=("$(api_addr "$id")")
  done
  local IFS=,
  printf '%s' "${out[*]}"
}

# pid_alive PID: the process exists and is not a zombie.
pid_alive() {
  local pid=$1 stat
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

# is_node_process PID N: PID is alive and is raftmesh running node N's data dir.
is_node_process() {
  local pid=$1 n=$2 arg dir
  local -a argv=()
  pid_alive "$pid" || return 1
  mapfile -d '' -t argv <"/proc/$pid/cmdline" 2>/dev/null || return 1
  ((${#argv[@]} > 0)) || return 1
  [[ ${argv[0]##*/} == raftmesh ]] || return 1
  dir=$(data_dir "$n")
  for arg in "${argv[@]}"; do
    [[ $arg == "$dir" ]] && return 0
  done
  return 1
}

# pid_from_file N: the pid recorded for node N (may be stale).
pid_from_file() {
  local f pid
  f=$(pid_file "$1")
  [[ -f $f ]] || return 1
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  printf '%s' "$pid"
}

# node_pid N: print node N's pid if its pid file points to its live process.
node_pid() {
  local pid
  pid=$(pid_from_file "$1") || return 1
  is_node_process "$pid" "$1" || return 1
  printf '%s' "$pid"
}

write_pid_file() {
  local f
  f=$(pid_file "$1")
  printf '%s\n' "$2" >"$f.tmp"
  mv -f "$f.tmp" "$f"
}

# json_field KEY: read a flat JSON object on stdin, print KEY's value
# (strings unquoted, null as "null"). Enough for /v1/cluster/status and
# addrs.json; no jq needed.
json_field() {
  sed -nE "s/.*\"$1\"[[:space:]]*:[[:space:]]*(\"[^\"]*\"|[^,}[:space:]]*).*/\1/p" | tr -d '"'
}

# node_status N: print node N's /v1/cluster/status body.
node_status() {
  "${CURL[@]}" "http://$(api_addr "$1")/v1/cluster/status" 2>/dev/null
}

ensure_binary() {
  if [[ ! -x $BIN ]]; then
    info "building $BIN"
    (cd "$ROOT" && cargo build --profile dist --bin raftmesh)
  fi
  [[ -x $BIN ]] || die "$BIN missing after build"
}

# start_node N: launch node N in the background (own session, so neither
# SIGHUP nor a Ctrl-C in this terminal reaches it) unless it already runs.
# Sets NODE_PID; NODE_STARTED is 1 if this call launched it.
start_node() {
  local n=$1 log
  # shellcheck disable=SC2034 # read by the calling script
  NODE_STARTED=0
  if NODE_PID=$(node_pid "$n"); then
    return 0
  fi
  mkdir -p "$(data_dir "$n")"
  rm -f "$(pid_file "$n")"
  log=$(log_file "$n")
  printf '=== %s cluster: starting node%s ===\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$n" >>"$log"
  # setsid does not fork here (a background job of a non-interactive shell is
  # not a process group leader), so $! is the node's pid once it execs.
  # RAFTMESH_AGENT_ARGS: extra agent flags for every node (timings, say).
  local -a extra=()
  read -r -a extra <<<"${RAFTMESH_AGENT_ARGS:-}"
  nohup setsid "$BIN" agent \
    --id "$n" \
    --api-addr "$(api_addr "$n")" \
    --peer-addr "$(peer_addr "$n")" \
    --proxy-addr "$(proxy_addr "$n")" \
    --bootstrap-expect "${#NODE_IDS[@]}" \
    --join "$(join_list)" \
    --data-dir "$(data_dir "$n")" \
    "${extra[@]}" \
    </dev/null >>"$log" 2>&1 &
  NODE_PID=$!
  # shellcheck disable=SC2034 # read by the calling script
  NODE_STARTED=1
  write_pid_file "$n" "$NODE_PID"
}

# wait_node_ready N PID DEADLINE: wait until node N has written addrs.json
# for this process and answers /livez. Fails if the process exits first.
wait_node_ready() {
  local n=$1 pid=$2 deadline=$3 addrs rpid
  addrs="$(data_dir "$n")/addrs.json"
  while :; do
    rpid=$(json_field pid 2>/dev/null <"$addrs" || true)
    if ! pid_alive "$pid"; then
      # Should setsid ever have forked, the node records its real pid.
      if [[ -n $rpid && $rpid != "$pid" ]] && is_node_process "$rpid" "$n"; then
        pid=$rpid
        write_pid_file "$n" "$pid"
        continue
      fi
      warn "node$n (pid $pid) exited during startup"
      return 1
    fi
    if [[ $rpid == "$pid" ]] && "${CURL[@]}" -o /dev/null "http://$(api_addr "$n")/livez" 2>/dev/null; then
      return 0
    fi
    if ((SECONDS >= deadline)); then
      warn "node$n (pid $pid) not ready after ${CLUSTER_TIMEOUT}s"
      return 1
    fi
    sleep 0.2
  done
}

# tail_logs [N...]: last lines of the given nodes' logs (default: all).
tail_logs() {
  local n f
  (($# > 0)) || set -- "${NODE_IDS[@]}"
  for n in "$@"; do
    f=$(log_file "$n")
    [[ -f $f ]] || continue
    warn "----- $f (last 30 lines) -----"
    tail -n 30 "$f" >&2
  done
}

# print_status: one line per node (pid, liveness, Raft role, term, leader,
# applied index, API address).
print_status() {
  local n pid state role term leader applied json
  printf '%-5s %-8s %-12s %-10s %-5s %-7s %-8s %-24s %s\n' \
    NODE PID STATE ROLE TERM LEADER APPLIED API PROXY
  for n in "${NODE_IDS[@]}"; do
    role=- term=- leader=- applied=-
    if pid=$(node_pid "$n"); then
      if json=$(node_status "$n"); then
        state=up
        role=$(json_field role <<<"$json")
        term=$(json_field term <<<"$json")
        leader=$(json_field leader_id <<<"$json")
        applied=$(json_field applied_index <<<"$json")
        [[ $leader == null ]] && leader=none
      else
        state=unreachable
      fi
    else
      pid=- state=down
    fi
    printf '%-5s %-8s %-12s %-10s %-5s %-7s %-8s %-24s %s\n' \
      "$n" "$pid" "$state" "${role:--}" "${term:--}" "${leader:--}" "${applied:--}" \
      "http://$(api_addr "$n")" "http://$(proxy_addr "$n")"
  done
}
