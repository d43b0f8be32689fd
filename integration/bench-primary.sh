#!/usr/bin/env bash
# Benchmarks the primary replication mode through the real binaries, in one run,
# on tmpfs images:
#   a. guest workloads (`colo-blk bench`, libblkio) on a primary that forwards to
#      a secondary over nbd+unix (replication running on both: the secondary
#      started first, the primary with `--sync none` on equal fresh copies),
#      as ratios to plain mode on the same image. randread is a sanity row:
#      reads never leave the primary, so it should be about 1.0x.
#      For reference, the secondary's NBD export alone (also running) takes 4k
#      writes from `qemu-img bench` at QD1 and QD32: QD1 is what a queue worker
#      running one write at a time reaches (each pays one NBD round trip); a
#      primary hands its writes to the queue's I/O pool, several in flight, so
#      QD32 is its bound.
#   b. resync: `ctl start --sync full` of an image that is half holes
#      (alternating 1 MiB random data / 1 MiB hole) until query-replication
#      shows done == total, against `qemu-img convert -n` of the same image into
#      the same NBD export (a colo-blk secondary in stage none), both onto a
#      fresh empty secondary disk; reported as a throughput fraction.
# Servers are interleaved per round and each one's best round counts, so load
# from other processes hits all of them alike. A benchmark, not a test: it
# reports ratios and never fails on numbers (only on wrong results: the copies
# are compared byte for byte).
#
#   BENCH_SECONDS       seconds per guest workload (default 3)
#   BENCH_ROUNDS        rounds (default 2)
#   BENCH_SIZE_MB       guest image size in MiB (default 512)
#   BENCH_RESYNC_MB     resync image size in MiB (default 1024)
#   BENCH_BASELINE_BIN  another colo-blk binary (e.g. a build of the previous
#                       commit) whose primary is measured too, for before/after
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${BENCH_SECONDS:-3}
rounds=${BENCH_ROUNDS:-2}
size_mb=${BENCH_SIZE_MB:-512}
resync_mb=${BENCH_RESYNC_MB:-1024}
baseline=${BENCH_BASELINE_BIN:-}
workloads=seqwrite-1m-qd8,randwrite-4k-qd32,randread-4k-qd32

. integration/bench-lib.sh
bench_init primary-bench
bench_need qemu-img cmp
if [ -n "$baseline" ]; then
  [ -x "$baseline" ] || { echo "BENCH_BASELINE_BIN=$baseline is not executable" >&2; exit 1; }
fi

img=$work/disk.img
sec=$work/sec.img
: >"$work/results"
echo "== guest image: $size_mb MiB of random data on $(df --output=fstype "$work" | tail -1) ($work)"
dd if=/dev/urandom of="$img" bs=1M count="$size_mb" status=none

# guest_bench TAG SOCKET: runs the workloads, shows them, keeps
# "TAG workload iops p50 p99" in $work/results.
guest_bench() {
  "$bin" bench --socket "$2" --seconds "$seconds" --workloads "$workloads" >"$work/bench.out"
  grep -v '^RESULT' "$work/bench.out" | sed "s/^/  [$1] /"
  awk -v t="$1" '$1=="RESULT" { print t, $2, $3, $5, $6 }' "$work/bench.out" >>"$work/results"
}

run_plain() {
  rm -f "$work"/*.sock
  bench_start plain "$bin" serve --socket "$work/vhost.sock" --disk "$img" --num-queues 1
  bench_wait_socket "$work/vhost.sock"
  guest_bench plain "$work/vhost.sock"
  bench_stop "$bench_pid"
}

# start_secondary BIN DISK: a secondary (stage none) exporting DISK on nbd.sock.
start_secondary() {
  rm -f "$work"/*.sock "$2.active" "$2.hidden"
  bench_start secondary "$1" serve --socket "$work/sec-vhost.sock" --disk "$2" --num-queues 1 \
    --mode secondary --nbd-listen "unix:$work/nbd.sock" --control "$work/sec-ctl.sock"
  sec_pid=$bench_pid
  bench_wait_socket "$work/nbd.sock"
  bench_wait_socket "$work/sec-ctl.sock"
}

# start_primary BIN DISK: a primary (stage none) forwarding to nbd.sock.
start_primary() {
  bench_start primary "$1" serve --socket "$work/vhost.sock" --disk "$2" --num-queues 1 \
    --mode primary --secondary "nbd+unix:///parent0?socket=$work/nbd.sock" \
    --control "$work/pri-ctl.sock"
  pri_pid=$bench_pid
  bench_wait_socket "$work/vhost.sock"
  bench_wait_socket "$work/pri-ctl.sock"
}

# run_primary TAG BIN: a replicating pair on equal copies of the guest image.
run_primary() {
  local tag=$1 b=$2
  cp "$img" "$sec"
  start_secondary "$b" "$sec"
  start_primary "$b" "$img"
  "$b" ctl --control "$work/sec-ctl.sock" start >/dev/null
  "$b" ctl --control "$work/pri-ctl.sock" start --sync none >/dev/null
  guest_bench "$tag" "$work/vhost.sock"
  # A forwarding failure would make the numbers meaningless.
  "$b" ctl --control "$work/pri-ctl.sock" get-error >/dev/null ||
    { echo "[$tag] forwarding failed:" >&2; "$b" ctl --control "$work/pri-ctl.sock" get-error >&2; exit 1; }
  bench_stop "$pri_pid"
  bench_stop "$sec_pid"
  # Every write was forwarded: the secondary disk (without its overlays) holds them all.
  cmp -s "$img" "$sec" || { echo "[$tag] secondary disk differs from the primary disk" >&2; exit 1; }
  echo "  [$tag] secondary disk equals the primary disk"
}

# nbd_reference: 4k sequential writes straight into a running secondary's
# export, at QD1 and QD32; keeps "nbd-qdN 4k-write iops" in $work/results.
nbd_reference() {
  local d count t0 t1
  cp "$img" "$sec"
  start_secondary "$bin" "$sec"
  "$bin" ctl --control "$work/sec-ctl.sock" start >/dev/null
  for d in 1 32; do
    count=$((d == 1 ? 20000 : 60000))
    t0=$(bench_now_ns)
    qemu-img bench -f raw -w -t none -s 4k -d "$d" -c "$count" \
      "nbd+unix:///parent0?socket=$work/nbd.sock" >/dev/null
    t1=$(bench_now_ns)
    echo "nbd-qd$d 4k-write $(( count * 1000000000 / (t1 - t0) )) 0 0" >>"$work/results"
    echo "  [nbd export alone] 4k writes QD$d: $(( count * 1000000000 / (t1 - t0) )) IOPS"
  done
  bench_stop "$sec_pid"
}

rimg=$work/resync.img
rsec=$work/resync-sec.img
echo "== resync image: $resync_mb MiB, alternating 1 MiB random data / 1 MiB hole"
truncate -s "${resync_mb}M" "$rimg"
head -c "$((resync_mb / 2))M" /dev/urandom >"$work/random.bin"
for i in $(seq 0 $((resync_mb / 2 - 1))); do
  dd if="$work/random.bin" of="$rimg" bs=1M skip="$i" seek=$((2 * i)) count=1 conv=notrunc status=none
done
rm -f "$work/random.bin"
echo "  allocated: $(du -m "$rimg" | cut -f1) MiB of $resync_mb MiB"

fresh_target() {
  rm -f "$rsec"
  truncate -s "${resync_mb}M" "$rsec"
}

check_copy() {
  cmp -s "$rimg" "$rsec" || { echo "[$1] the copy differs from the source" >&2; exit 1; }
}

# resync_status CONTROL: "done total error" of the resync (error: null or a text).
resync_status() {
  local j done total error
  j=$("$bin" ctl --control "$1" --json status)
  done=$(sed -nE 's/.*"resync":\{[^}]*"done":([0-9]+).*/\1/p' <<<"$j")
  total=$(sed -nE 's/.*"resync":\{[^}]*"total":([0-9]+).*/\1/p' <<<"$j")
  error=$(sed -nE 's/.*"error":(null|"[^"]*").*/\1/p' <<<"$j")
  echo "${done:--} ${total:--} ${error:-?}"
}

run_resync() {
  local t0 t1 done total error
  fresh_target
  start_secondary "$bin" "$rsec"
  start_primary "$bin" "$rimg"
  t0=$(bench_now_ns)
  "$bin" ctl --control "$work/pri-ctl.sock" start --sync full >/dev/null
  while :; do
    read -r done total error < <(resync_status "$work/pri-ctl.sock")
    [ "$error" = null ] || { echo "[resync] failed: $error" >&2; exit 1; }
    [ "$total" != - ] && [ "$done" = "$total" ] && break
    sleep 0.02
  done
  t1=$(bench_now_ns)
  bench_stop "$pri_pid"
  bench_stop "$sec_pid"
  check_copy resync
  echo "resync $(( (t1 - t0) / 1000 ))" >>"$work/times"
  echo "  [colo-blk resync] $(( (t1 - t0) / 1000000 )) ms, copy equal"
}

run_convert() {
  local t0 t1
  fresh_target
  start_secondary "$bin" "$rsec"
  t0=$(bench_now_ns)
  qemu-img convert -n -f raw -O raw "$rimg" "nbd+unix:///parent0?socket=$work/nbd.sock"
  t1=$(bench_now_ns)
  bench_stop "$sec_pid"
  check_copy convert
  echo "convert $(( (t1 - t0) / 1000 ))" >>"$work/times"
  echo "  [qemu-img convert] $(( (t1 - t0) / 1000000 )) ms, copy equal"
}

echo "== $(bench_load) before; $seconds s per workload, $rounds round(s)"
: >"$work/times"
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  run_plain
  run_primary primary "$bin"
  if [ -n "$baseline" ]; then run_primary baseline "$baseline"; fi
  nbd_reference
  run_resync
  run_convert
done
echo "== $(bench_load) after"

# Best round per tag and workload (by IOPS).
best() {
  awk '{ k = $1 " " $2; if (!(k in v) || $3 > v[k]) { v[k] = $3; l[k] = $0 } } END { for (k in l) print l[k] }' "$work/results"
}
best >"$work/best"
tags="primary"
[ -n "$baseline" ] && tags="baseline primary"

echo
printf '| %-18s | %-23s |' workload "plain IOPS (p50/p99 us)"
for t in $tags; do printf ' %-23s | %-8s |' "$t IOPS (p50/p99)" "vs plain"; done
echo
printf '|%s|%s|' "--------------------" "-------------------------"
for _ in $tags; do printf '%s|%s|' "-------------------------" "----------"; done
echo
for w in ${workloads//,/ }; do
  printf '| %-18s |' "$w"
  awk -v w="$w" '$1=="plain" && $2==w { printf " %8d (%5.0f/%6.0f) |", $3, $4, $5 }' "$work/best"
  for t in $tags; do
    awk -v w="$w" -v t="$t" '
      $1=="plain" && $2==w { base=$3 }
      $1==t && $2==w { v=$3; p50=$4; p99=$5 }
      END { printf " %8d (%5.0f/%6.0f) | %7.2fx |", v, p50, p99, (base > 0 ? v / base : 0) }' "$work/best"
  done
  echo
done

echo
awk '$1=="plain" && $2=="randwrite-4k-qd32" { base=$3 }
  $1 ~ /^nbd-qd/ { v[$1]=$3 }
  END {
    printf "| %-52s | %8s | %-8s |\n", "4k writes into the secondary NBD export alone", "IOPS", "vs plain"
    printf "|%s|%s|%s|\n", "------------------------------------------------------", "----------", "----------"
    printf "| %-52s | %8d | %7.2fx |\n", "qemu-img bench QD1 (one write in flight at a time)", v["nbd-qd1"], v["nbd-qd1"] / base
    printf "| %-52s | %8d | %7.2fx |\n", "qemu-img bench QD32", v["nbd-qd32"], v["nbd-qd32"] / base
  }' "$work/best"

echo
awk -v mb="$resync_mb" '
  $1=="resync" && (!r || $2 < r) { r=$2 }
  $1=="convert" && (!c || $2 < c) { c=$2 }
  END {
    printf "| %-44s | %8s | %10s | %-8s |\n", "copy of " mb " MiB, 50% holes, into a colo-blk NBD export", "ms", "MiB/s", "fraction"
    printf "|%s|%s|%s|%s|\n", "----------------------------------------------", "----------", "------------", "----------"
    printf "| %-44s | %8.0f | %10.0f | %7.2fx |\n", "qemu-img convert -n (nbd+unix)", c / 1000, mb / (c / 1e6), 1
    printf "| %-44s | %8.0f | %10.0f | %7.2fx |\n", "colo-blk ctl start --sync full", r / 1000, mb / (r / 1e6), c / r
  }' "$work/times"
