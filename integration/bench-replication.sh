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
#   * O_DIRECT rows: the same guest workloads on a fully allocated image on the
#     machine's own disk (BENCH_DISK_DIR, default /var/tmp): plain `serve
#     --direct` vs `--mode secondary --direct` with replication running
#     (overlays beside the image, page cache), median of BENCH_ROUNDS
#     interleaved rounds, with the server's CPU (% of one core) and threads.
# A benchmark, not a test: it reports ratios, it never fails on numbers.
#
#   COLO_BLK_BIN     colo-blk under test (default: this checkout's build)
#   BENCH_SECONDS    seconds per guest workload (default 3)
#   BENCH_SIZE_MB    tmpfs image size in MiB (default 512)
#   BENCH_DIRECT_MB  O_DIRECT image size in MiB (default 1024; 0 skips)
#   BENCH_ROUNDS     O_DIRECT rounds, the median counts (default 3)
#   QUICK=1          smoke test: 0.5 s per workload, 256 MiB, 1 round
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${QUICK:-0}" = 1 ]; then
  d_seconds=0.5 d_size=256 d_direct=256 d_rounds=1
else
  d_seconds=3 d_size=512 d_direct=1024 d_rounds=3
fi
seconds=${BENCH_SECONDS:-$d_seconds}
size_mb=${BENCH_SIZE_MB:-$d_size}
direct_mb=${BENCH_DIRECT_MB:-$d_direct}
rounds=${BENCH_ROUNDS:-$d_rounds}
. integration/bench-lib.sh
bench_init repl-bench
bench_need qemu-img python3 findmnt
server_pid=
stop_server() {
  if [ -n "$server_pid" ]; then bench_stop "$server_pid"; fi
  server_pid=
}

img="$work/disk.img"
echo "== image: $size_mb MiB of random data, overlays beside it, on $(df --output=fstype "$work" | tail -1)"
dd if=/dev/urandom of="$img" bs=1M count="$size_mb" status=none

# serve_secondary [IMG [ARGS...]]: a secondary (stage none) on IMG (default $img).
serve_secondary() {
  local disk=${1:-$img}
  shift || true
  rm -f "$work"/*.sock
  bench_start server "$colo" serve --socket "$work/vhost.sock" --disk "$disk" --mode secondary \
    --nbd-listen "unix:$work/nbd.sock" --control "$work/ctl.sock" "$@"
  server_pid=$bench_pid
  bench_wait_socket "$work/vhost.sock"
  bench_wait_socket "$work/nbd.sock"
  bench_wait_socket "$work/ctl.sock"
}

ctl() { "$colo" ctl --control "$work/ctl.sock" "$@" >/dev/null; }

# bench TAG WORKLOADS: runs `colo-blk bench`, keeps "TAG workload iops p50 p99".
bench() {
  "$bin" bench --socket "$work/vhost.sock" --seconds "$seconds" --workloads "$2" |
    awk -v t="$1" '$1=="RESULT" { print t, $2, $3, $5, $6 }' >>"$work/results"
}

echo "== $(bench_load) before; $seconds s per workload"
: >"$work/results"

bench_start server "$colo" serve --socket "$work/vhost.sock" --disk "$img"
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

if [ "$direct_mb" != 0 ]; then
  bench_disk_dir repl-bench
  dimg=$disk_work/disk.img
  echo
  echo "== O_DIRECT: $direct_mb MiB of random data on $disk_desc ($disk_work), written with O_DIRECT; $rounds round(s)"
  bench_fill_image "$dimg" "$direct_mb"
  : >"$work/direct.res"
  # dbench TAG ROUND WORKLOADS: guest workloads on the running server, with its
  # CPU and threads; "TAG ROUND workload iops mbps p50 p99 cpu threads".
  dbench() {
    "$bin" bench --socket "$work/vhost.sock" --seconds "$seconds" --workloads "$3" --pid "$server_pid" |
      awk -v t="$1" -v r="$2" '$1=="RESULT" { print t, r, $2, $3, $4, $5, $6, $7, $8 }' >>"$work/direct.res"
  }
  for round in $(seq 1 "$rounds"); do
    echo "== O_DIRECT round $round ($(bench_load))"
    rm -f "$work"/*.sock
    bench_start server "$colo" serve --socket "$work/vhost.sock" --disk "$dimg" --direct
    server_pid=$bench_pid
    bench_wait_socket "$work/vhost.sock"
    dbench plain "$round" randread-4k-qd32,randwrite-4k-qd32
    stop_server
    serve_secondary "$dimg" --direct
    ctl start
    dbench clean "$round" randread-4k-qd32
    dbench clean "$round" randwrite-4k-qd32
    dbench dirty "$round" randread-4k-qd32
    stop_server
  done
  bench_median "$work/direct.res" >"$work/direct.med"
  echo
  echo "O_DIRECT image on $disk_desc, 4k, QD32, 1 queue, median of $rounds; overlays beside the image (page cache):"
  echo
  printf '| %-44s | %-22s | %-8s | %-6s | %-7s |\n' "guest workload, --direct (QD32, 4k)" "IOPS (p50/p99 us)" "vs plain" "cpu %" "threads"
  printf '|%s|%s|%s|%s|%s|\n' "----------------------------------------------" "------------------------" "----------" "--------" "---------"
  drow() {
    awk -v tag="$1" -v w="$2" -v label="$3" '
      $1=="plain" && $3==w { base=$4 }
      $1==tag && $3==w { v=$4; p50=$6; p99=$7; cpu=$8; th=$9 }
      END { printf "| %-44s | %8d (%5.0f/%6.0f) | %7.2fx | %6s | %7s |\n", label, v, p50, p99, (base > 0 ? v / base : 0), cpu, th }' "$work/direct.med"
  }
  drow plain randread-4k-qd32 "plain --direct randread"
  drow clean randread-4k-qd32 "secondary --direct randread, running, clean"
  drow dirty randread-4k-qd32 "secondary --direct randread, dirty active"
  drow plain randwrite-4k-qd32 "plain --direct randwrite"
  drow clean randwrite-4k-qd32 "secondary --direct randwrite (into active)"
fi
echo "== $(bench_load) after"
