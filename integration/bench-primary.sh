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
#   c. O_DIRECT: the same pair with both disks on the machine's own disk
#      (BENCH_DISK_DIR, default /var/tmp; fully allocated images) served with
#      --direct: primary guest 4k randwrite/randread QD32 vs plain `serve
#      --direct` on the same image, next to the secondary's NBD export alone
#      (--direct, `qemu-img bench` QD32).
# The primary's thread count (/proc/PID/task) is sampled half-way through each
# guest workload. Servers are interleaved per round and each one's best round
# counts, so load from other processes hits all of them alike. A benchmark,
# not a test: it reports ratios and never fails on numbers (only on wrong
# results: the copies are compared byte for byte).
#
#   COLO_BLK_BIN        colo-blk under test (default: this checkout's build)
#   BENCH_SECONDS       seconds per guest workload (default 3)
#   BENCH_ROUNDS        rounds (default 2)
#   BENCH_SIZE_MB       guest image size in MiB (default 512)
#   BENCH_RESYNC_MB     resync image size in MiB (default 1024)
#   BENCH_DIRECT_MB     O_DIRECT image size in MiB (default 1024; 0 skips c.)
#   BASELINE_BIN        another colo-blk binary (e.g. a build of the previous
#   (BENCH_BASELINE_BIN) commit) whose primary is measured too, for before/after;
#   BASELINE_REV        or a git rev to build it from (see bench-lib.sh)
#   QUICK=1             smoke test: 0.5 s per workload, 1 round, 256 MiB images
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${QUICK:-0}" = 1 ]; then
  d_seconds=0.5 d_rounds=1 d_size=256 d_resync=256 d_direct=256
else
  d_seconds=3 d_rounds=2 d_size=512 d_resync=1024 d_direct=1024
fi
seconds=${BENCH_SECONDS:-$d_seconds}
rounds=${BENCH_ROUNDS:-$d_rounds}
size_mb=${BENCH_SIZE_MB:-$d_size}
resync_mb=${BENCH_RESYNC_MB:-$d_resync}
direct_mb=${BENCH_DIRECT_MB:-$d_direct}
workloads=seqwrite-1m-qd8,randwrite-4k-qd32,randread-4k-qd32
direct_workloads=randwrite-4k-qd32,randread-4k-qd32

. integration/bench-lib.sh
bench_init primary-bench
bench_need qemu-img cmp findmnt
bench_baseline

img=$work/disk.img
sec=$work/sec.img
: >"$work/results"
echo "== guest image: $size_mb MiB of random data on $(df --output=fstype "$work" | tail -1) ($work)"
dd if=/dev/urandom of="$img" bs=1M count="$size_mb" status=none

# guest_bench TAG SOCKET PID [WORKLOADS]: runs the workloads (default
# $workloads), shows them, keeps "TAG workload iops p50 p99 threads" in
# $work/results (threads: of process PID, sampled half-way).
guest_bench() {
  "$bin" bench --socket "$2" --seconds "$seconds" --workloads "${4:-$workloads}" --pid "$3" >"$work/bench.out"
  grep -v '^RESULT' "$work/bench.out" | sed "s/^/  [$1] /"
  awk -v t="$1" '$1=="RESULT" { print t, $2, $3, $5, $6, $8 }' "$work/bench.out" >>"$work/results"
}

# run_plain [TAG DISK [ARGS...]]: plain mode on DISK (default: plain, $img).
run_plain() {
  local tag=${1:-plain} disk=${2:-$img}
  shift 2 || shift $#
  rm -f "$work"/*.sock
  bench_start plain "$colo" serve --socket "$work/vhost.sock" --disk "$disk" --num-queues 1 "$@"
  bench_wait_socket "$work/vhost.sock"
  if [ "$tag" = plain ]; then
    guest_bench "$tag" "$work/vhost.sock" "$bench_pid"
  else
    guest_bench "$tag" "$work/vhost.sock" "$bench_pid" "$direct_workloads"
  fi
  bench_stop "$bench_pid"
}

# start_secondary BIN DISK [ARGS...]: a secondary (stage none) exporting DISK
# on nbd.sock.
start_secondary() {
  local b=$1 disk=$2
  shift 2
  rm -f "$work"/*.sock "$disk.active" "$disk.hidden"
  bench_start secondary "$b" serve --socket "$work/sec-vhost.sock" --disk "$disk" --num-queues 1 \
    --mode secondary --nbd-listen "unix:$work/nbd.sock" --control "$work/sec-ctl.sock" "$@"
  sec_pid=$bench_pid
  bench_wait_socket "$work/nbd.sock"
  bench_wait_socket "$work/sec-ctl.sock"
}

# start_primary BIN DISK [ARGS...]: a primary (stage none) forwarding to nbd.sock.
start_primary() {
  local b=$1 disk=$2
  shift 2
  bench_start primary "$b" serve --socket "$work/vhost.sock" --disk "$disk" --num-queues 1 \
    --mode primary --secondary "nbd+unix:///parent0?socket=$work/nbd.sock" \
    --control "$work/pri-ctl.sock" "$@"
  pri_pid=$bench_pid
  bench_wait_socket "$work/vhost.sock"
  bench_wait_socket "$work/pri-ctl.sock"
}

# run_primary TAG BIN [PRIMARY SECONDARY WORKLOADS [ARGS...]]: a replicating
# pair on equal copies of the guest image (default $img, $sec, $workloads);
# ARGS go to both servers (--direct).
run_primary() {
  local tag=$1 b=$2 pdisk=${3:-$img} sdisk=${4:-$sec} wl=${5:-$workloads}
  shift 2
  shift 3 || shift $#
  cp "$pdisk" "$sdisk"
  start_secondary "$b" "$sdisk" "$@"
  start_primary "$b" "$pdisk" "$@"
  "$b" ctl --control "$work/sec-ctl.sock" start >/dev/null
  "$b" ctl --control "$work/pri-ctl.sock" start --sync none >/dev/null
  guest_bench "$tag" "$work/vhost.sock" "$pri_pid" "$wl"
  # A forwarding failure would make the numbers meaningless.
  "$b" ctl --control "$work/pri-ctl.sock" get-error >/dev/null ||
    { echo "[$tag] forwarding failed:" >&2; "$b" ctl --control "$work/pri-ctl.sock" get-error >&2; exit 1; }
  bench_stop "$pri_pid"
  bench_stop "$sec_pid"
  # Every write was forwarded: the secondary disk (without its overlays) holds them all.
  cmp -s "$pdisk" "$sdisk" || { echo "[$tag] secondary disk differs from the primary disk" >&2; exit 1; }
  echo "  [$tag] secondary disk equals the primary disk"
}

# nbd_reference [PREFIX DISK DEPTHS [ARGS...]]: 4k sequential writes straight
# into a running secondary's export on a copy of DISK (default $img), at each
# of DEPTHS (default "1 32"); keeps "PREFIX-qdN 4k-write iops" (PREFIX
# default nbd) in $work/results.
nbd_reference() {
  local prefix=${1:-nbd} disk=${2:-$img} depths=${3:-1 32} sdisk=$sec d count t0 t1
  shift 3 || shift $#
  [ "$disk" = "$img" ] || sdisk=$dsec
  cp "$disk" "$sdisk"
  start_secondary "$colo" "$sdisk" "$@"
  "$colo" ctl --control "$work/sec-ctl.sock" start >/dev/null
  for d in $depths; do
    count=$((d == 1 ? 20000 : 60000))
    [ "${QUICK:-0}" = 1 ] && count=$((count / 4))
    t0=$(bench_now_ns)
    qemu-img bench -f raw -w -t none -s 4k -d "$d" -c "$count" \
      "nbd+unix:///parent0?socket=$work/nbd.sock" >/dev/null
    t1=$(bench_now_ns)
    echo "$prefix-qd$d 4k-write $(( count * 1000000000 / (t1 - t0) )) 0 0 -" >>"$work/results"
    echo "  [$prefix export alone] 4k writes QD$d: $(( count * 1000000000 / (t1 - t0) )) IOPS"
  done
  # Sequential 4k writes share a cluster 16 at a time, so the secondary copies
  # before write once per 16; a random guest workload pays it on nearly every
  # write. A step of one cluster + 4k makes every write start a new cluster
  # (one pass at most, past what the runs above wrote, so none is copied twice).
  local step=$((69632)) from=$((256 << 20)) size passes
  size=$(stat -c %s "$sdisk")
  passes=$(( (size - from) / step ))
  count=$(( passes < 60000 ? passes : 60000 ))
  [ "${QUICK:-0}" = 1 ] && count=$((count / 4))
  t0=$(bench_now_ns)
  qemu-img bench -f raw -w -t none -s 4k -S "$step" -o "$from" -d 32 -c "$count" \
    "nbd+unix:///parent0?socket=$work/nbd.sock" >/dev/null
  t1=$(bench_now_ns)
  echo "$prefix-qd32s 4k-write $(( count * 1000000000 / (t1 - t0) )) 0 0 -" >>"$work/results"
  echo "  [$prefix export alone] 4k writes QD32, a new cluster each: $(( count * 1000000000 / (t1 - t0) )) IOPS"
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
  j=$("$colo" ctl --control "$1" --json status)
  done=$(sed -nE 's/.*"resync":\{[^}]*"done":([0-9]+).*/\1/p' <<<"$j")
  total=$(sed -nE 's/.*"resync":\{[^}]*"total":([0-9]+).*/\1/p' <<<"$j")
  error=$(sed -nE 's/.*"error":(null|"[^"]*").*/\1/p' <<<"$j")
  echo "${done:--} ${total:--} ${error:-?}"
}

run_resync() {
  local t0 t1 done total error
  fresh_target
  start_secondary "$colo" "$rsec"
  start_primary "$colo" "$rimg"
  t0=$(bench_now_ns)
  "$colo" ctl --control "$work/pri-ctl.sock" start --sync full >/dev/null
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
  start_secondary "$colo" "$rsec"
  t0=$(bench_now_ns)
  qemu-img convert -n -f raw -O raw "$rimg" "nbd+unix:///parent0?socket=$work/nbd.sock"
  t1=$(bench_now_ns)
  bench_stop "$sec_pid"
  check_copy convert
  echo "convert $(( (t1 - t0) / 1000 ))" >>"$work/times"
  echo "  [qemu-img convert] $(( (t1 - t0) / 1000000 )) ms, copy equal"
}

if [ "$direct_mb" != 0 ]; then
  bench_disk_dir primary-bench
  dimg=$disk_work/disk.img
  dsec=$disk_work/sec.img
  echo "== O_DIRECT images: $direct_mb MiB of random data on $disk_desc ($disk_work), written with O_DIRECT"
  bench_fill_image "$dimg" "$direct_mb"
fi

echo "== $(bench_load) before; $seconds s per workload, $rounds round(s)"
: >"$work/times"
for round in $(seq 1 "$rounds"); do
  echo "== round $round ($(bench_load))"
  run_plain
  run_primary primary "$colo"
  if [ -n "$baseline" ]; then run_primary baseline "$baseline"; fi
  nbd_reference
  if [ "$direct_mb" != 0 ]; then
    run_plain plain-direct "$dimg" --direct
    run_primary primary-direct "$colo" "$dimg" "$dsec" "$direct_workloads" --direct
    if [ -n "$baseline" ]; then
      run_primary baseline-direct "$baseline" "$dimg" "$dsec" "$direct_workloads" --direct
    fi
    nbd_reference nbd-direct "$dimg" 32 --direct
  fi
  run_resync
  run_convert
done
echo "== $(bench_load) after"

# Best round per tag and workload (by IOPS).
best() {
  awk '{ k = $1 " " $2; if (!(k in v) || $3 > v[k]) { v[k] = $3; l[k] = $0 } } END { for (k in l) print l[k] }' "$work/results"
}
best >"$work/best"

# guest_table PLAIN TAGS WORKLOADS: plain vs each tag, with the tag's
# thread count (one queue, so threads per queue = threads minus the
# process's fixed ones: main, control, NBD).
guest_table() {
  local plain=$1 tags=$2 wls=$3 t w
  printf '| %-18s | %-23s |' workload "$plain IOPS (p50/p99 us)"
  for t in $tags; do printf ' %-23s | %-8s | %-7s |' "$t IOPS (p50/p99)" "vs plain" threads; done
  echo
  printf '|%s|%s|' "--------------------" "-------------------------"
  for _ in $tags; do printf '%s|%s|%s|' "-------------------------" "----------" "---------"; done
  echo
  for w in ${wls//,/ }; do
    printf '| %-18s |' "$w"
    awk -v w="$w" -v p="$plain" '$1==p && $2==w { printf " %8d (%5.0f/%6.0f) |", $3, $4, $5 }' "$work/best"
    for t in $tags; do
      awk -v w="$w" -v t="$t" -v p="$plain" '
        $1==p && $2==w { base=$3 }
        $1==t && $2==w { v=$3; p50=$4; p99=$5; th=$6 }
        END { printf " %8d (%5.0f/%6.0f) | %7.2fx | %7s |", v, p50, p99, (base > 0 ? v / base : 0), th }' "$work/best"
    done
    echo
  done
}

# nbd_table PLAIN PREFIX PRIMARY LABEL: the NBD export alone vs plain, and
# the primary's randwrite QD32 as a fraction of the export alone at QD32.
nbd_table() {
  awk -v p="$1" -v n="$2" -v pri="$3" -v label="$4" '
    $1==p && $2=="randwrite-4k-qd32" { base=$3 }
    $1==pri && $2=="randwrite-4k-qd32" { prim=$3 }
    $1 ~ ("^" n "-qd") { v[substr($1, length(n) + 2)]=$3 }
    END {
      printf "| %-60s | %8s | %-8s |\n", "4k writes into the secondary NBD export alone" label, "IOPS", "vs plain"
      printf "|%s|%s|%s|\n", "--------------------------------------------------------------", "----------", "----------"
      if ("qd1" in v) printf "| %-60s | %8d | %7.2fx |\n", "qemu-img bench QD1 (one write in flight at a time)", v["qd1"], v["qd1"] / base
      printf "| %-60s | %8d | %7.2fx |\n", "qemu-img bench QD32", v["qd32"], v["qd32"] / base
      if ("qd32s" in v) printf "| %-60s | %8d | %7.2fx |\n", "qemu-img bench QD32, each write in a new cluster (-S 68k)", v["qd32s"], v["qd32s"] / base
      printf "| %-60s | %8d | %7.2fx |\n", "primary guest randwrite-4k-qd32, vs the export alone at QD32", prim, (v["qd32"] > 0 ? prim / v["qd32"] : 0)
      if ("qd32s" in v) printf "| %-60s | %8d | %7.2fx |\n", "primary guest randwrite-4k-qd32, vs a new cluster each", prim, (v["qd32s"] > 0 ? prim / v["qd32s"] : 0)
    }' "$work/best"
}

tags="primary"
[ -n "$baseline" ] && tags="baseline primary"
echo
echo "tmpfs images, 1 queue, best of $rounds round(s):"
echo
guest_table plain "$tags" "$workloads"
echo
nbd_table plain nbd primary ""
if [ "$direct_mb" != 0 ]; then
  dtags="primary-direct"
  [ -n "$baseline" ] && dtags="baseline-direct primary-direct"
  echo
  echo "O_DIRECT images on $disk_desc ($direct_mb MiB, both servers --direct), 1 queue, best of $rounds round(s):"
  echo
  guest_table plain-direct "$dtags" "$direct_workloads"
  echo
  nbd_table plain-direct nbd-direct primary-direct ", --direct"
fi

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
