#!/usr/bin/env bash
# Worst guest latency during a secondary's failover commit: a secondary
# (stage running) whose guest has written FILL MiB into the active overlay
# runs 4k random read/write at QD8 (libblkio, cli/examples/commit-latency.rs)
# while `replication-stop {failover: true}` commits active ▸ hidden into the
# disk. One fresh secondary per run; prints each run's worst latency during
# the commit, before it and just after it, the secondary's own per-phase
# timing of the commit (lock waits and holds, copy, release, rests), then the
# worst over all runs. A benchmark: it never fails on numbers (target: worst
# <= 20 ms for 256 MiB).
#
# The machine may be shared: the "before" figures (same load, no commit) say
# how much of a worst case is the scheduler's. With a baseline, each run does
# the baseline first and this build next, so both see the same load.
#
#   BENCH_RUNS      runs (default 10)
#   BENCH_FILL_MB   active overlay data in MiB (default 256)
#   BENCH_DIRECT=1  secondary disk with --direct on the machine's disk
#                   (default: tmpfs)
#   BASELINE_BIN / BASELINE_REV  another colo-blk to interleave (bench-lib.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${BENCH_RUNS:-10}
fill=${BENCH_FILL_MB:-256}

. integration/bench-lib.sh
bench_init commit-latency
bench_baseline
cargo build --release --quiet --example commit-latency
ex="${CARGO_TARGET_DIR:-target}/release/examples/commit-latency"
dir=$work
extra=()
if [ "${BENCH_DIRECT:-0}" = 1 ]; then
  dir=$(mktemp -d "$PWD/target/commit-latency.XXXXXX")
  extra=(--direct)
fi
servers=(this="$colo")
[ -z "${baseline:-}" ] || servers=(baseline="$baseline" "${servers[@]}")
echo "== $(bench_load); $runs run(s), $fill MiB committed, disk in $dir"
: >"$work/results"
for run in $(seq 1 "$runs"); do
  for server in "${servers[@]}"; do
    tag=${server%%=*}
    rm -f "$dir/sec.img" "$dir/sec.img.active" "$dir/sec.img.hidden"
    truncate -s "$((2 * fill))M" "$dir/sec.img"
    bench_start secondary "${server#*=}" serve --mode secondary --socket "$work/vhost.sock" \
      --disk "$dir/sec.img" --control "$work/ctl.sock" --nbd-listen "unix:$work/nbd.sock" \
      --num-queues 8 "${extra[@]}"
    sec_pid=$bench_pid
    bench_wait_socket "$work/vhost.sock"
    "$bin" ctl --control "$work/ctl.sock" start >/dev/null
    line=$("$ex" "$work/vhost.sock" "$work/ctl.sock" "$fill" 8)
    echo "  run $run $tag ($(cut -d' ' -f1 /proc/loadavg)): ${line#RESULT }"
    echo "$tag $line" >>"$work/results"
    bench_stop "$sec_pid"
    # The secondary's own per-phase timing of the commit (what the guest waited on).
    grep -o 'commit of .*' "$work/secondary.log" | sed 's/^/      /' || true
  done
done
[ "$dir" = "$work" ] || rm -rf "$dir"
for server in "${servers[@]}"; do
  tag=${server%%=*}
  awk -v tag="$tag" '$1 == tag {
       for (i = 1; i <= NF; i++) if ($i == "worst") { v = $(i + 1) + 0; w[++n] = v; if (v > m) m = v; break }
     }
     END {
       s = ""; for (i = 1; i <= n; i++) s = s sprintf(" %.1f", w[i])
       printf "RESULT commit-latency %s: worst guest latency during the commit over %d runs: %.1f ms (runs:%s)\n", tag, n, m, s
     }' "$work/results"
done
echo "== $(bench_load) after"
