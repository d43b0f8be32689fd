#!/usr/bin/env bash
# Benchmarks colo-blk against qemu-storage-daemon's vhost-user-blk export
# (aio=threads and aio=io_uring) on the same tmpfs image, in one run, with the
# same client (`colo-blk bench`, libblkio). Prints the ratio colo-blk / better
# peer per workload. A benchmark, not a test: it reports, it never fails on
# numbers.
#
#   BENCH_SECONDS  seconds per workload (default 3)
#   BENCH_ROUNDS   rounds over all servers; each server's best round counts
#                  (default 1; use 2-3 on a busy machine)
#   BENCH_SIZE_MB  image size in MiB (default 512)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${BENCH_SECONDS:-3}
rounds=${BENCH_ROUNDS:-1}
size_mb=${BENCH_SIZE_MB:-512}
. integration/bench-lib.sh
bench_init bench
bench_need qemu-storage-daemon

img="$work/disk.img"
echo "== image: $size_mb MiB of random data on $(df --output=fstype "$work" | tail -1) ($work)"
dd if=/dev/urandom of="$img" bs=1M count="$size_mb" status=none

# run_server NAME CMD...: starts the server, benchmarks it, stops it (by pid).
run_server() {
  local name=$1 sock=$work/$1.sock
  shift
  bench_start "$name" "$@"
  bench_wait_socket "$sock"
  "$bin" bench --socket "$sock" --seconds "$seconds" | tee -a "$work/$name.out" | grep -v '^RESULT' | sed "s/^/  [$name] /"
  bench_stop "$bench_pid"
}

qsd() {
  local aio=$1
  exec qemu-storage-daemon \
    --blockdev "driver=file,node-name=file0,filename=$img,cache.direct=off,aio=$aio" \
    --export "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=$work/qsd-$aio.sock,writable=on,num-queues=1"
}

echo "== $(bench_load) before; $seconds s per workload, $rounds round(s)"
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  run_server colo-blk "$bin" serve --socket "$work/colo-blk.sock" --disk "$img" --num-queues 1
  run_server qsd-threads qsd threads
  run_server qsd-io_uring qsd io_uring
done
echo "== $(bench_load) after"

# Best round per server and workload (by IOPS), then the table.
best() { awk '$1=="RESULT" { if (!($2 in v) || $3 > v[$2]) { v[$2]=$3; l[$2]=$0 } } END { for (k in l) print l[k] }' "$work/$1.out"; }
best colo-blk >"$work/a"; best qsd-threads >"$work/b"; best qsd-io_uring >"$work/c"

echo
printf '| %-18s | %-24s | %-24s | %-24s | %-12s |\n' workload "colo-blk IOPS (p50/p99 us)" "qsd threads IOPS (p50/p99)" "qsd io_uring IOPS (p50/p99)" "colo/best"
printf '|%s|%s|%s|%s|%s|\n' "--------------------" "--------------------------" "--------------------------" "--------------------------" "--------------"
for w in seqwrite-1m-qd8 seqread-1m-qd8 randread-4k-qd1 randwrite-4k-qd1 randread-4k-qd32 randwrite-4k-qd32; do
  a=$(awk -v w="$w" '$2==w' "$work/a"); b=$(awk -v w="$w" '$2==w' "$work/b"); c=$(awk -v w="$w" '$2==w' "$work/c")
  [ -n "$a" ] && [ -n "$b" ] && [ -n "$c" ] || continue
  echo "$a|$b|$c" | awk -F'|' -v w="$w" '{
    split($1, A, " "); split($2, B, " "); split($3, C, " ")
    peer = (B[3] > C[3]) ? B[3] : C[3]
    printf "| %-18s | %8d (%6.1f/%7.1f) | %8d (%6.1f/%7.1f) | %8d (%6.1f/%7.1f) | %10.2fx |\n",
      w, A[3], A[5], A[6], B[3], B[5], B[6], C[3], C[5], C[6], A[3] / peer
  }'
done
