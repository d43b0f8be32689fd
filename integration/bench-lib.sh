# Shell helpers shared by the integration/bench-*.sh scripts. Sourced, not run:
#
#   . "$(dirname "$0")/bench-lib.sh"
#   bench_init NAME        # release build, $bin, $work (tmpfs), EXIT trap
#   bench_start NAME CMD.. # CMD in the background, output in $work/NAME.log,
#                          # pid in $bench_pid (stopped by pid at exit)
#   bench_wait_socket PATH # until the socket accepts, or the last start died
#   bench_stop PID         # stop one process by pid and reap it
#   bench_load             # "load x y z on N CPUs" for the report
#
# Every process started with bench_start is stopped by pid on every exit path
# (normal end, error under `set -e`, Ctrl-C), then $work is removed.

bench_pids=()
bench_pid=
declare -A bench_logs=()

bench_cleanup() {
  local p
  for p in "${bench_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${bench_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  bench_pids=()
  if [ -n "${work:-}" ]; then rm -rf "$work"; fi
}

# bench_init NAME: builds the release binary and makes a scratch directory on
# tmpfs (so the disk never limits what is measured).
bench_init() {
  local target=${CARGO_TARGET_DIR:-target}
  cargo build --release --quiet
  bin="$target/release/colo-blk"
  local shm=/dev/shm
  [ -d "$shm" ] && [ -w "$shm" ] || shm=${TMPDIR:-/tmp}
  work=$(mktemp -d "$shm/colo-blk-$1.XXXXXX")
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

bench_need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || {
      echo "$tool not found (run integration/install-deps.sh)" >&2
      exit 1
    }
  done
}

bench_start() {
  local name=$1
  shift
  "$@" >"$work/$name.log" 2>&1 &
  bench_pid=$!
  bench_pids+=("$bench_pid")
  bench_logs[$bench_pid]="$work/$name.log"
}

bench_stop() {
  local p keep=()
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for p in "${bench_pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  bench_pids=("${keep[@]}")
}

# bench_wait_socket PATH [PID]: waits until PATH exists as a socket; fails
# early (with the log) when PID (default: the last bench_start) exits.
bench_wait_socket() {
  local pid=${2:-$bench_pid}
  for _ in $(seq 1 1000); do
    [ -S "$1" ] && return 0
    kill -0 "$pid" 2>/dev/null || {
      echo "server exited early:" >&2
      cat "${bench_logs[$pid]:-/dev/null}" >&2
      return 1
    }
    sleep 0.01
  done
  echo "no socket $1" >&2
  return 1
}

bench_load() {
  echo "load $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
}

# Nanoseconds since the epoch, for wall-clock intervals.
bench_now_ns() { date +%s%N; }
