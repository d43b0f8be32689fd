#!/usr/bin/env bash
# Benchmarks the secondary replication node through the real binary, against
# plain mode on the same image, in one run:
#   * guest 4k random read/write at QD32 (`colo-blk bench`, libblkio): plain,
#     secondary with clean overlays, secondary after the writes (dirty active);
#   * checkpoint of the dirty overlays through `colo-blk ctl` (includes process
#     start and the QMP round trip; the library bench times the node alone);
#   * the primary's write stream over NBD (`qemu-img bench`, 4k sequential QD32):
#     stage none (no copy-before-write) vs running right after a checkpoint
#     (first touch copies each 64k cluster) vs running with every cluster
#     already copied.
# A benchmark, not a test: it reports ratios, it never fails on numbers.
#
#   BENCH_SECONDS  seconds per guest workload (default 3)
#   BENCH_SIZE_MB  image size in MiB (default 512)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${BENCH_SECONDS:-3}
size_mb=${BENCH_SIZE_MB:-512}
. integration/bench-lib.sh
bench_init repl-bench
bench_need qemu-img
server_pid=
stop_server() {
  if [ -n "$server_pid" ]; then bench_stop "$server_pid"; fi
  server_pid=
}

img="$work/disk.img"
echo "== image: $size_mb MiB of random data, overlays beside it, on $(df --output=fstype "$work" | tail -1)"
dd if=/dev/urandom of="$img" bs=1M count="$size_mb" status=none

serve_secondary() {
  rm -f "$work"/*.sock
  bench_start server "$bin" serve --socket "$work/vhost.sock" --disk "$img" --mode secondary \
    --nbd-listen "unix:$work/nbd.sock" --control "$work/ctl.sock"
  server_pid=$bench_pid
  bench_wait_socket "$work/vhost.sock"
  bench_wait_socket "$work/nbd.sock"
  bench_wait_socket "$work/ctl.sock"
}

ctl() { "$bin" ctl --control "$work/ctl.sock" "$@" >/dev/null; }

# bench TAG WORKLOADS: runs `colo-blk bench`, keeps "TAG workload iops p50 p99".
bench() {
  "$bin" bench --socket "$work/vhost.sock" --seconds "$seconds" --workloads "$2" |
    awk -v t="$1" '$1=="RESULT" { print t, $2, $3, $5, $6 }' >>"$work/results"
}

echo "== $(bench_load) before; $seconds s per workload"
: >"$work/results"

bench_start server "$bin" serve --socket "$work/vhost.sock" --disk "$img"
server_pid=$bench_pid
bench_wait_socket "$work/vhost.sock"
bench plain randread-4k-qd32,randwrite-4k-qd32
stop_server

serve_secondary
ctl start
bench clean randread-4k-qd32
bench clean randwrite-4k-qd32
bench dirty randread-4k-qd32
dirty_kb=$(( $(du -k "$img.active" | cut -f1) + $(du -k "$img.hidden" | cut -f1) ))
t0=$(bench_now_ns); ctl checkpoint; t1=$(bench_now_ns)
ckpt_ms=$(( (t1 - t0) / 1000000 ))
after_kb=$(( $(du -k "$img.active" | cut -f1) + $(du -k "$img.hidden" | cut -f1) ))
stop_server

echo
printf '| %-26s | %-22s | %-8s |\n' "guest workload (QD32, 4k)" "IOPS (p50/p99 us)" "vs plain"
printf '|%s|%s|%s|\n' "----------------------------" "------------------------" "----------"
row() {
  awk -v tag="$1" -v w="$2" -v label="$3" '
    $1=="plain" && $2==w { base=$3 }
    $1==tag && $2==w { v=$3; p50=$4; p99=$5 }
    END { printf "| %-26s | %8d (%5.0f/%6.0f) | %7.2fx |\n", label, v, p50, p99, (base > 0 ? v / base : 0) }' "$work/results"
}
row plain randread-4k-qd32 "plain randread"
row clean randread-4k-qd32 "secondary randread, clean"
row dirty randread-4k-qd32 "secondary randread, dirty"
row plain randwrite-4k-qd32 "plain randwrite"
row clean randwrite-4k-qd32 "secondary randwrite"
echo
echo "checkpoint via ctl: $ckpt_ms ms for $((dirty_kb / 1024)) MiB of dirty overlays (after: $((after_kb / 1024)) MiB allocated)"

# Primary write stream over NBD.
count=$(( size_mb * 256 / 2 ))
qbench() {
  qemu-img bench -f raw -w -t none -s 4k -d 32 -c "$count" \
    "nbd+unix:///parent0?socket=$work/nbd.sock" 2>&1 | awk '/Run completed in/ { print $4 }'
}
serve_secondary
none_s=$(qbench)
ctl start
first_s=$(qbench)
copied_s=$(qbench)
stop_server
echo
echo "primary 4k sequential writes over NBD, QD32, $count requests:"
awk -v n="$count" -v a="$none_s" -v b="$first_s" -v c="$copied_s" 'BEGIN {
  printf "| %-34s | %10s | %-8s |\n", "stage", "IOPS", "vs none"
  printf "|%s|%s|%s|\n", "------------------------------------", "------------", "----------"
  printf "| %-34s | %10.0f | %7.2fx |\n", "none (initial sync, no CBW)", n / a, 1
  printf "| %-34s | %10.0f | %7.2fx |\n", "running, first touch (CBW copies)", n / b, a / b
  printf "| %-34s | %10.0f | %7.2fx |\n", "running, clusters already copied", n / c, a / c
}'
echo "== $(bench_load) after"
