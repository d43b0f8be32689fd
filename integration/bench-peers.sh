#!/usr/bin/env bash
# Benchmarks colo-blk against its peers, in one run, with the same client
# (`colo-blk bench`, libblkio), servers interleaved per workload, median of
# the rounds. Prints Markdown tables of IOPS (p50 completion latency in us) and
# ratios. A benchmark, not a test: it reports, it never fails on numbers.
#
# tmpfs table (page cache, 1 queue; the image on /dev/shm):
#   colo-blk [--poll-us 0] [baseline] vs qemu-storage-daemon --export
#   vhost-user-blk aio=threads and aio=io_uring (cache.direct=off);
#   4k random read/write QD1 and QD32, 1 MiB sequential read/write QD8.
# O_DIRECT table (an image on the machine's own disk, fully allocated):
#   colo-blk serve --direct [--poll-us 0] [baseline] vs qemu-storage-daemon
#   aio=io_uring and aio=native with cache.direct=on (2 queues of 256
#   exported), and fio --ioengine=io_uring --direct=1 on the same file as the
#   device's limit; 4k random read/write QD1, QD32, QD128, 1 MiB sequential
#   read/write QD8, 4k random read/write on 2 queues x QD32.
# CPU table: the server's utime+stime per second (/proc/PID/stat, % of one
#   core) with a frontend connected and no I/O for BENCH_IDLE_SECONDS (after a
#   1 s randread QD1 warm-up), and during load; its thread count under load.
# Every run gets a fresh server process; within a round each workload runs on
# every server in turn, the order rotating between rounds.
#
# When the binary under test takes --poll-us (`serve --help`), it runs twice:
# with polling on (--poll-us BENCH_POLL_US, default 50) and with --poll-us 0
# (serve's default).
#
#   COLO_BLK_BIN        colo-blk under test (default: this checkout's release
#                       build, which always runs the client)
#   BASELINE_BIN        another colo-blk (e.g. the previous commit) measured too
#   BASELINE_REV        or a git rev to build it from (see bench-lib.sh)
#   BENCH_TABLES        tmpfs,direct (default both)
#   BENCH_SECONDS       seconds per workload (default 2)
#   BENCH_ROUNDS        rounds; the median counts (default 3)
#   BENCH_SIZE_MB       tmpfs image size in MiB (default 512)
#   BENCH_DIRECT_MB     O_DIRECT image size in MiB (default 1024)
#   BENCH_DISK_DIR      where the O_DIRECT image goes (default /var/tmp; must
#                       be on a block device, not tmpfs)
#   BENCH_IDLE_SECONDS  idle CPU window (default 10)
#   QUICK=1             smoke test: 0.5 s per workload, 1 round, 256 MiB
#                       images, 2 s idle (numbers meaningless)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${QUICK:-0}" = 1 ]; then
  d_seconds=0.5 d_rounds=1 d_size=256 d_direct=256 d_idle=2
else
  d_seconds=2 d_rounds=3 d_size=512 d_direct=1024 d_idle=10
fi
seconds=${BENCH_SECONDS:-$d_seconds}
rounds=${BENCH_ROUNDS:-$d_rounds}
size_mb=${BENCH_SIZE_MB:-$d_size}
direct_mb=${BENCH_DIRECT_MB:-$d_direct}
idle=${BENCH_IDLE_SECONDS:-$d_idle}
tables=${BENCH_TABLES:-tmpfs,direct}

. integration/bench-lib.sh
bench_init bench
bench_need qemu-storage-daemon fio python3 findmnt
bench_baseline
poll=
bench_has_poll "$colo" && poll=1
poll_us=${BENCH_POLL_US:-50}

tmpfs_rows=seqwrite-1m-qd8,seqread-1m-qd8,randread-4k-qd1,randwrite-4k-qd1,randread-4k-qd32,randwrite-4k-qd32
direct_rows=randread-4k-qd1,randwrite-4k-qd1,randread-4k-qd32,randwrite-4k-qd32,randread-4k-qd128,randwrite-4k-qd128,seqread-1m-qd8,seqwrite-1m-qd8,randread-4k-2q-qd32,randwrite-4k-2q-qd32

# run_vhost OUT TAG ROUND IDLE WORKLOADS CMD...: starts CMD (which listens on
# $work/TAG.sock), benchmarks it with CPU probing, stops it by pid, and
# appends "TAG ROUND WORKLOAD IOPS MBPS P50 P99 CPU THREADS" lines to OUT;
# $last_iops is the IOPS of the last workload.
run_vhost() {
  local out=$1 tag=$2 round=$3 idle_s=$4 workloads=$5 sock=$work/$2.sock secs=$seconds
  shift 5
  local extra=()
  if [ "$idle_s" != 0 ]; then extra=(--idle-seconds "$idle_s"); secs=1; fi
  rm -f "$sock"
  bench_start "$tag" "$@"
  bench_wait_socket "$sock"
  if ! "$bin" bench --socket "$sock" --seconds "$secs" --workloads "$workloads" \
    --queue-size 256 --pid "$bench_pid" "${extra[@]}" >"$work/out" 2>&1; then
    echo "[$tag] bench failed:" >&2
    cat "$work/out" "${bench_logs[$bench_pid]}" >&2
    exit 1
  fi
  bench_stop "$bench_pid"
  awk -v t="$tag" -v r="$round" '$1=="RESULT" { print t, r, $2, $3, $4, $5, $6, $7, $8 }' \
    "$work/out" >>"$out"
  last_iops=$(awk '$1=="RESULT" && $2!="idle" { v=$3 } END { print v }' "$work/out")
}

# colo BIN SOCKTAG IMG QUEUES ARGS...: a plain colo-blk on IMG.
colo() {
  local b=$1 tag=$2 img=$3 q=$4
  shift 4
  exec "$b" serve --socket "$work/$tag.sock" --disk "$img" --num-queues "$q" --queue-size 256 "$@"
}

# qsd TAG IMG AIO DIRECT QUEUES: qemu-storage-daemon exporting IMG.
qsd() {
  exec qemu-storage-daemon \
    --blockdev "driver=file,node-name=file0,filename=$2,cache.direct=$4,aio=$3" \
    --export "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=$work/$1.sock,writable=on,num-queues=$5"
}

# server_cmd TABLE TAG: the command of server TAG for TABLE, in $cmd.
server_cmd() {
  local img=${timg:-} q=1 cache=off extra=()
  if [ "$1" = direct ]; then img=$dimg q=2 cache=on extra=(--direct); fi
  case "$2" in
    colo) cmd=(colo "$colo" colo "$img" "$q" "${extra[@]}" ${poll:+--poll-us "$poll_us"}) ;;
    colo-nopoll) cmd=(colo "$colo" colo-nopoll "$img" "$q" "${extra[@]}" --poll-us 0) ;;
    baseline) cmd=(colo "$baseline" baseline "$img" "$q" "${extra[@]}") ;;
    qsd-threads) cmd=(qsd qsd-threads "$img" threads "$cache" "$q") ;;
    qsd-io_uring) cmd=(qsd qsd-io_uring "$img" io_uring "$cache" "$q") ;;
    qsd-native) cmd=(qsd qsd-native "$img" native "$cache" "$q") ;;
    *) echo "unknown server $2" >&2; exit 1 ;;
  esac
}

# measure TABLE ROWS SERVERS...: BENCH_ROUNDS rounds; in each, every workload
# of ROWS runs on every server in turn (a fresh server process per run; the
# order rotates each round, so no server always follows the same one) into
# $work/TABLE.res. "fio" as a server runs fio on the O_DIRECT image.
measure() {
  local table=$1 rows=$2 round w k n off tag line
  shift 2
  local servers=("$@")
  n=${#servers[@]}
  for round in $(seq 1 "$rounds"); do
    echo "== $table round $round ($(bench_load))"
    off=$(( (round - 1) % n ))
    for w in ${rows//,/ }; do
      line="  $w:"
      for k in $(seq 0 $((n - 1))); do
        tag=${servers[$(( (k + off) % n ))]}
        if [ "$tag" = fio ]; then
          run_fio "$round" "$w" "$dimg"
        else
          server_cmd "$table" "$tag"
          run_vhost "$work/$table.res" "$tag" "$round" 0 "$w" "${cmd[@]}"
        fi
        line+=" $tag=$last_iops"
      done
      echo "$line"
    done
  done
}

# measure_idle TABLE SERVERS...: per server, a short randread-4k-qd1 run, then
# BENCH_IDLE_SECONDS connected with no I/O; the idle CPU goes to TABLE.res.
measure_idle() {
  local table=$1 tag
  shift
  echo "== $table: idle CPU, $idle s per server ($(bench_load))"
  for tag in "$@"; do
    server_cmd "$table" "$tag"
    : >"$work/idle.res"
    run_vhost "$work/idle.res" "$tag" 1 "$idle" randread-4k-qd1 "${cmd[@]}"
    grep ' idle ' "$work/idle.res" >>"$work/$table.res"
    echo "  $tag: $(awk '{ print $8 }' "$work/idle.res" | tail -1) % of a core"
  done
}

# run_fio ROUND WORKLOAD IMG: fio io_uring O_DIRECT on the image itself, one
# job per queue of the workload; appends to direct.res like run_vhost (total
# percentiles; no CPU column: fio is the client).
run_fio() {
  local round=$1 w=$2 img=$3 rw bs qd jobs=1
  case "$w" in
    seqwrite-1m-qd8) rw=write bs=1M qd=8 ;;
    seqread-1m-qd8) rw=read bs=1M qd=8 ;;
    rand*-4k-2q-qd32) rw=${w%%-*} bs=4k qd=32 jobs=2 ;;
    rand*-4k-qd*) rw=${w%%-*} bs=4k qd=${w##*-qd} ;;
    *) echo "run_fio: no mapping for $w" >&2; exit 1 ;;
  esac
  fio --name=device --filename="$img" --ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" \
    --iodepth="$qd" --numjobs="$jobs" --group_reporting --norandommap --randrepeat=0 --lat_percentiles=1 \
    --time_based --runtime="$(awk -v s="$seconds" 'BEGIN { printf "%d", s * 1000 }')ms" \
    --output-format=json >"$work/fio.json" 2>"$work/fio.err" ||
    { echo "fio failed:" >&2; cat "$work/fio.err" >&2; exit 1; }
  python3 - "$work/fio.json" "$round" "$w" >>"$work/direct.res" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
iops = job["read"]["iops"] + job["write"]["iops"]
bw = job["read"]["bw_bytes"] + job["write"]["bw_bytes"]
side = job["write"] if job["write"]["iops"] > job["read"]["iops"] else job["read"]
pct = side["lat_ns"].get("percentile") or side["clat_ns"].get("percentile", {})
p50 = pct.get("50.000000", 0) / 1000
p99 = pct.get("99.000000", 0) / 1000
print(f"fio {sys.argv[2]} {sys.argv[3]} {iops:.0f} {bw / 1e6:.1f} {p50:.1f} {p99:.1f} - -")
PY
  last_iops=$(tail -1 "$work/direct.res" | awk '{ print $4 }')
}

echo "== $(bench_load) at start; $seconds s per workload, $rounds round(s), median counts"
echo "== $(bench_wake_cost)"
echo "== colo-blk under test: $colo$( [ -n "$poll" ] && echo " (takes --poll-us: runs with --poll-us $poll_us and 0)")"

opt=()
[ -n "$poll" ] && opt+=(colo-nopoll)
[ -n "$baseline" ] && opt+=(baseline)

if [[ ,$tables, == *,tmpfs,* ]]; then
  timg=$work/disk.img
  echo "== tmpfs table: $size_mb MiB of random data on $(df --output=fstype "$work" | tail -1) ($work)"
  dd if=/dev/urandom of="$timg" bs=1M count="$size_mb" status=none
  : >"$work/tmpfs.res"
  measure tmpfs "$tmpfs_rows" colo "${opt[@]}" qsd-threads qsd-io_uring
  rm -f "$timg"
fi

if [[ ,$tables, == *,direct,* ]]; then
  bench_disk_dir bench
  dimg=$disk_work/disk.img
  echo "== O_DIRECT table: $direct_mb MiB of random data on $disk_desc ($disk_work), written with O_DIRECT"
  bench_fill_image "$dimg" "$direct_mb"
  echo "  allocated: $(du -m "$dimg" | cut -f1) MiB of $direct_mb MiB"
  : >"$work/direct.res"
  measure direct "$direct_rows" colo "${opt[@]}" qsd-io_uring qsd-native fio
  measure_idle direct colo "${opt[@]}" qsd-io_uring
fi
echo "== $(bench_load) at end"
echo "== $(bench_wake_cost)"

colo_label="colo-blk"
[ -n "$poll" ] && colo_label="colo-blk --poll-us $poll_us"
if [[ ,$tables, == *,tmpfs,* ]]; then
  bench_median "$work/tmpfs.res" >"$work/tmpfs.med"
  echo
  echo "tmpfs, page cache, 1 queue, $size_mb MiB image; IOPS (p50 us), median of $rounds:"
  echo
  bench_table "$work/tmpfs.med" "$tmpfs_rows" \
    "colo=$colo_label,colo-nopoll=colo-blk --poll-us 0,baseline=colo-blk baseline,qsd-threads=qsd aio=threads,qsd-io_uring=qsd aio=io_uring" \
    "colo / better qsd=colo/max(qsd-threads|qsd-io_uring),colo / baseline=colo/baseline,--poll-us 0 / better qsd=colo-nopoll/max(qsd-threads|qsd-io_uring),--poll-us 0 / baseline=colo-nopoll/baseline"
fi
if [[ ,$tables, == *,direct,* ]]; then
  bench_median "$work/direct.res" >"$work/direct.med"
  echo
  echo "O_DIRECT, $direct_mb MiB image on $disk_desc, queue size 256; IOPS (p50 us), median of $rounds:"
  echo
  bench_table "$work/direct.med" "$direct_rows" \
    "colo=$colo_label --direct,colo-nopoll=--direct --poll-us 0,baseline=baseline --direct,qsd-io_uring=qsd io_uring,qsd-native=qsd native,fio=fio io_uring (device)" \
    "colo / fio=colo/fio,--poll-us 0 / fio=colo-nopoll/fio,colo / better qsd=colo/max(qsd-io_uring|qsd-native),--poll-us 0 / better qsd=colo-nopoll/max(qsd-io_uring|qsd-native),baseline / better qsd=baseline/max(qsd-io_uring|qsd-native)"
  echo
  echo "O_DIRECT against fio round by round (each run over fio's run in the same round): median (range) of $rounds:"
  echo
  bench_paired "$work/direct.res" "$direct_rows" fio \
    "colo=$colo_label --direct,colo-nopoll=--direct --poll-us 0,baseline=baseline --direct,qsd-io_uring=qsd io_uring,qsd-native=qsd native"
  echo
  echo "Server CPU (utime+stime per second, % of one core; idle: ${idle} s connected, no I/O; load: the median run), O_DIRECT:"
  echo
  bench_cpu_table "$work/direct.med" randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd128,randread-4k-2q-qd32 \
    "colo=$colo_label,colo-nopoll=colo-blk --poll-us 0,baseline=colo-blk baseline,qsd-io_uring=qsd io_uring,qsd-native=qsd native"
fi
