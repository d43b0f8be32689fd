# Shell helpers shared by the integration/bench-*.sh scripts. Sourced, not run:
#
#   . "$(dirname "$0")/bench-lib.sh"
#   bench_init NAME        # release build, $bin, $colo, $work (tmpfs), EXIT trap
#   bench_disk_dir NAME    # $disk_work: scratch dir on the machine's own disk
#   bench_baseline         # $baseline: BASELINE_BIN, or built from BASELINE_REV
#   bench_has_poll BIN     # does BIN's `serve` take --poll-us?
#   bench_start NAME CMD.. # CMD in the background, output in $work/NAME.log,
#                          # pid in $bench_pid (stopped by pid at exit)
#   bench_wait_socket PATH # until the socket accepts, or the last start died
#   bench_stop PID         # stop one process by pid and reap it
#   bench_load             # "load x y z on N CPUs" for the report
#   bench_wake_cost        # eventfd round trip between two threads, same
#                          # CPU and across CPUs, for the report
#
# Every process started with bench_start is stopped by pid on every exit path
# (normal end, error under `set -e`, Ctrl-C), then $work (and $disk_work) is
# removed.
#
# Binaries: $bin is this checkout's release build and always runs the client
# (`colo-blk bench`); $colo is the colo-blk under test, env COLO_BLK_BIN
# (default: $bin), so another engine can be measured with this harness.
# QUICK=1 asks a script for short runs (smoke test, numbers meaningless).

bench_pids=()
bench_pid=
declare -A bench_logs=()

bench_cleanup() {
  local p
  for p in "${bench_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${bench_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  bench_pids=()
  if [ -n "${work:-}" ]; then rm -rf "$work"; fi
  if [ -n "${disk_work:-}" ]; then rm -rf "$disk_work"; fi
  if [ -n "${baseline_src:-}" ]; then rm -rf "$baseline_src"; fi
}

# bench_init NAME: builds the release binary and makes a scratch directory on
# tmpfs (so the disk never limits what is measured).
bench_init() {
  local target=${CARGO_TARGET_DIR:-target}
  cargo build --release --quiet
  bin="$target/release/colo-blk"
  colo=${COLO_BLK_BIN:-$bin}
  [ -x "$colo" ] || { echo "COLO_BLK_BIN=$colo is not executable" >&2; exit 1; }
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

# A vhost-user round trip is two wake-ups across threads (the frontend's kick,
# the backend's call); fio, the device's limit, has none. What one costs on
# this machine decides how close to fio any backend can get, so the report
# carries it: the median eventfd ping-pong between two threads pinned to the
# same CPU, then to the first and last CPU (both sleep in read between turns).
bench_wake_cost() {
  python3 - <<'PY'
import os, statistics, threading, time

def round_trip(cpu_a, cpu_b, n=3000):
    a, b = os.eventfd(0), os.eventfd(0)

    def peer():
        os.sched_setaffinity(0, {cpu_b})
        for _ in range(n):
            os.eventfd_read(a)
            os.eventfd_write(b, 1)

    t = threading.Thread(target=peer)
    mask = os.sched_getaffinity(0)
    t.start()
    os.sched_setaffinity(0, {cpu_a})
    lat = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        os.eventfd_write(a, 1)
        os.eventfd_read(b)
        lat.append(time.perf_counter_ns() - t0)
    t.join()
    os.sched_setaffinity(0, mask)
    os.close(a)
    os.close(b)
    return statistics.median(lat) / 1000

cpus = sorted(os.sched_getaffinity(0))
same = round_trip(cpus[0], cpus[0])
if len(cpus) > 1:
    print(f"wake-up round trip: {same:.1f} us on one CPU, {round_trip(cpus[0], cpus[-1]):.1f} us across CPUs")
else:
    print(f"wake-up round trip: {same:.1f} us on one CPU (only one CPU)")
PY
}

# Nanoseconds since the epoch, for wall-clock intervals.
bench_now_ns() { date +%s%N; }

# bench_disk_dir NAME: a scratch directory on the machine's own disk (not
# tmpfs), under BENCH_DISK_DIR (default /var/tmp), in $disk_work; removed at
# exit. Fails when that directory is on tmpfs/ramfs/overlay or has no block
# device behind it. Sets $disk_desc ("/dev/vda ext4" ...).
bench_disk_dir() {
  local base=${BENCH_DISK_DIR:-/var/tmp} src fstype
  read -r src fstype < <(findmnt -n -o SOURCE,FSTYPE -T "$base")
  case "$fstype" in
    tmpfs | ramfs | overlay | devtmpfs)
      echo "$base is on $fstype, not a disk: set BENCH_DISK_DIR" >&2
      exit 1
      ;;
  esac
  # btrfs/LVM sources may carry a [subvolume] suffix.
  [ -b "${src%%[*}" ] || { echo "$base: $src is not a block device: set BENCH_DISK_DIR" >&2; exit 1; }
  disk_work=$(mktemp -d "$base/colo-blk-$1.XXXXXX")
  disk_desc="$src $fstype"
}

# bench_fill_image PATH MIB: PATH becomes MIB MiB of random data, written
# with O_DIRECT and fsync'ed, so every block is allocated (not sparse).
bench_fill_image() {
  dd if=/dev/urandom of="$1" bs=1M count="$2" oflag=direct conv=fsync status=none
}

# bench_has_poll BIN: true when BIN's `serve` takes --poll-us.
bench_has_poll() {
  "$1" serve --help 2>/dev/null | grep -q -- '--poll-us'
}

# bench_baseline: sets $baseline to the colo-blk to compare with (empty when
# neither is set):
#   BASELINE_BIN  a colo-blk binary (e.g. a build of the previous commit);
#                 BENCH_BASELINE_BIN is accepted too (older name)
#   BASELINE_REV  a git rev (HEAD~1, a branch, a hash): its tree is exported
#                 with `git archive` into a temporary directory (no worktree
#                 is registered, nothing in the checkout changes) and built
#                 there with CARGO_TARGET_DIR=target/baseline-build (kept, so
#                 the next build is incremental); the binary is cached as
#                 target/baseline-build/colo-blk-HASH.
bench_baseline() {
  baseline=${BASELINE_BIN:-${BENCH_BASELINE_BIN:-}}
  if [ -n "$baseline" ]; then
    [ -x "$baseline" ] || { echo "BASELINE_BIN=$baseline is not executable" >&2; exit 1; }
    return 0
  fi
  [ -n "${BASELINE_REV:-}" ] || return 0
  local hash tdir
  hash=$(git rev-parse --verify --short=12 "${BASELINE_REV}^{commit}") ||
    { echo "BASELINE_REV=$BASELINE_REV is not a commit" >&2; exit 1; }
  tdir=$(realpath -m "${CARGO_TARGET_DIR:-target}")/baseline-build
  baseline=$tdir/colo-blk-$hash
  if [ ! -x "$baseline" ]; then
    echo "== building the baseline $BASELINE_REV ($hash) into $tdir (first time: a few minutes)"
    baseline_src=$(mktemp -d "${TMPDIR:-/tmp}/colo-blk-baseline.XXXXXX")
    git archive "$hash" | tar -x -C "$baseline_src"
    (cd "$baseline_src" && CARGO_TARGET_DIR=$tdir cargo build --release --quiet --bin colo-blk)
    cp "$tdir/release/colo-blk" "$baseline.tmp"
    mv "$baseline.tmp" "$baseline"
    rm -rf "$baseline_src"
    baseline_src=
  fi
  echo "== baseline: $baseline ($BASELINE_REV = $hash)"
}

# bench_median FILE: FILE holds "TAG ROUND WORKLOAD IOPS MBPS P50 P99 CPU
# THREADS" lines; prints, per TAG and WORKLOAD, the line of the run with the
# median IOPS (lower middle for an even count), so its latency and CPU come
# from the same run.
bench_median() {
  sort -k1,1 -k3,3 -k4,4n "$1" | awk '
    { k = $1 " " $3; n[k]++; line[k, n[k]] = $0; if (!(k in seen)) { seen[k] = 1; order[++m] = k } }
    END { for (i = 1; i <= m; i++) { k = order[i]; print line[k, int((n[k] + 1) / 2)] } }'
}

# bench_table MEDIANS ROWS COLUMNS [RATIOS]: a Markdown table from the
# bench_median output MEDIANS. ROWS: comma-separated workloads. COLUMNS:
# comma-separated TAG=Header (one column per server: "IOPS (p50 us)").
# RATIOS: comma-separated Header=TAG/DEN, DEN a TAG or max(TAG|TAG...) (the
# better of several), printed as IOPS ratios. Tags missing from MEDIANS are
# dropped (optional servers), a ratio that needs one too.
bench_table() {
  python3 - "$@" <<'PY'
import sys
medians, rows, cols = sys.argv[1], sys.argv[2], sys.argv[3]
ratios = sys.argv[4] if len(sys.argv) > 4 else ""
res = {}
for line in open(medians):
    f = line.split()
    if len(f) >= 7:
        res[(f[0], f[2])] = (float(f[3]), float(f[5]))
tags = {t for t, _ in res}
cols = [c.split("=", 1) for c in cols.split(",") if c]
cols = [(t, h) for t, h in cols if t in tags]
rats = []
for r in [r for r in ratios.split(",") if r]:
    head, expr = r.split("=", 1)
    num, den = expr.split("/", 1)
    dens = den[4:-1].split("|") if den.startswith("max(") else [den]
    dens = [d for d in dens if d in tags]
    if num in tags and dens:
        rats.append((head, num, dens))
def cell(t, w):
    v = res.get((t, w))
    return "-" if v is None else f"{v[0]:.0f} ({v[1]:.0f})"
heads = ["workload"] + [h for _, h in cols] + [h for h, _, _ in rats]
print("| " + " | ".join(heads) + " |")
print("|---|" + "---:|" * (len(heads) - 1))
for w in [w for w in rows.split(",") if w]:
    out = [w] + [cell(t, w) for t, _ in cols]
    for _, num, dens in rats:
        n = res.get((num, w))
        d = max((res[(x, w)][0] for x in dens if (x, w) in res), default=0)
        out.append(f"{n[0] / d:.2f}x" if n and d > 0 else "-")
    print("| " + " | ".join(out) + " |")
PY
}

# bench_paired RESULTS ROWS DEN COLUMNS: a Markdown table of each server's IOPS
# over DEN's (a TAG) round by round, from the raw "TAG ROUND WORKLOAD IOPS ..."
# lines of RESULTS: the median of the per-round ratios and their range. The
# disk drifts between rounds (a slow minute slows every server in it), so a
# ratio taken within each round shows less of that drift than a ratio of two
# medians. COLUMNS: comma-separated TAG=Header; tags absent are dropped.
bench_paired() {
  python3 - "$@" <<'PY'
import statistics, sys
results, rows, den, cols = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
iops = {}
for line in open(results):
    f = line.split()
    if len(f) >= 4 and f[2] != "idle":
        iops[(f[0], f[1], f[2])] = float(f[3])
tags = {t for t, _, _ in iops}
cols = [c.split("=", 1) for c in cols.split(",") if c]
cols = [(t, h) for t, h in cols if t in tags]
print("| workload | " + " | ".join(h for _, h in cols) + " |")
print("|---|" + "---:|" * len(cols))
for w in [w for w in rows.split(",") if w]:
    out = [w]
    for t, _ in cols:
        r = [v / iops[(den, rd, w)] for (tt, rd, ww), v in iops.items()
             if tt == t and ww == w and iops.get((den, rd, w), 0) > 0]
        out.append(f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})" if r else "-")
    print("| " + " | ".join(out) + " |")
PY
}

# bench_cpu_table MEDIANS WORKLOADS COLUMNS: server CPU use (utime+stime per
# second, % of one core) with the connection open and no I/O ("idle", when
# measured) and during each of WORKLOADS, and the server's thread count under
# load; one row per TAG=Label of COLUMNS present in MEDIANS.
bench_cpu_table() {
  python3 - "$@" <<'PY'
import sys
medians, works, cols = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
res = {}
for line in open(medians):
    f = line.split()
    if len(f) >= 9:
        res[(f[0], f[2])] = (f[7], f[8])
tags = {t for t, _ in res}
cols = [c.split("=", 1) for c in cols.split(",") if c]
heads = ["server", "idle, % of a core"] + [f"{w}, %" for w in works] + ["threads (load)"]
print("| " + " | ".join(heads) + " |")
print("|---|" + "---:|" * (len(heads) - 1))
for t, label in cols:
    if t not in tags:
        continue
    out = [label, res.get((t, "idle"), ("-", "-"))[0]]
    out += [res.get((t, w), ("-", "-"))[0] for w in works]
    out.append(res.get((t, works[-1]), ("-", "-"))[1])
    print("| " + " | ".join(out) + " |")
PY
}
