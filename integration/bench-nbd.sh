#!/usr/bin/env bash
# NBD server benchmark: `qemu-img bench` against colo-blk's NBD server and
# against `qemu-storage-daemon --export nbd` (aio=threads and aio=io_uring),
# all serving the same image on tmpfs, in one run. Prints a Markdown table of
# throughputs and ratios (colo-blk / best QEMU); absolute numbers depend on the
# machine, the ratios are what the README reports.
#
# Usage: integration/bench-nbd.sh [REPEATS]   (default 3; the best run counts)
# Env:   BENCH_DIR (default /dev/shm/colo-blk-bench-nbd), IMAGE_MB (default 512)
set -euo pipefail
cd "$(dirname "$0")/.."

REPEATS=${1:-3}
DIR=${BENCH_DIR:-/dev/shm/colo-blk-bench-nbd}
IMAGE_MB=${IMAGE_MB:-512}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

cargo build --release --quiet --example nbd-serve
SERVE="$CARGO_TARGET_DIR/release/examples/nbd-serve"

rm -rf "$DIR"
mkdir -p "$DIR"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT

# Real data everywhere, so no server can answer reads with holes.
dd if=/dev/urandom of="$DIR/disk.img" bs=1M count="$IMAGE_MB" status=none

wait_socket() {
    for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done
    echo "socket $1 never appeared" >&2
    exit 1
}

"$SERVE" --image "$DIR/disk.img" --listen "unix:$DIR/colo.sock" >/dev/null 2>"$DIR/colo.log" &
PIDS+=($!)
QSD=()
for aio in threads io_uring; do
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=disk,filename=$DIR/disk.img,aio=$aio" \
        --nbd-server "addr.type=unix,addr.path=$DIR/qsd-$aio.sock" \
        --export "type=nbd,id=exp,node-name=disk,name=parent0,writable=on" \
        >/dev/null 2>"$DIR/qsd-$aio.log" &
    PIDS+=($!)
    QSD+=("$aio")
done
wait_socket "$DIR/colo.sock"
for aio in "${QSD[@]}"; do wait_socket "$DIR/qsd-$aio.sock"; done

# name | qemu-img bench arguments
WORKLOADS=(
    "4k read QD32|-d 32 -s 4096 -S 4096 -c 200000"
    "4k write QD32|-w -d 32 -s 4096 -S 4096 -c 200000"
    "1M read QD8|-d 8 -s 1M -S 1M -c 3000"
    "1M write QD8|-w -d 8 -s 1M -S 1M -c 3000"
)

# Wall time of one run, in seconds.
run_time() {
    local sock=$1 args=$2 t0 t1
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    qemu-img bench -f raw $args "nbd+unix:///parent0?socket=$sock" >/dev/null
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}

min() { echo "if ($1 < $2) $1 else $2" | bc -l; }

ops_of() { # count seconds -> ops/s
    echo "$1 / $2" | bc -l | xargs printf '%.0f'
}

echo
echo "qemu-img bench over nbd+unix, image ${IMAGE_MB} MiB on tmpfs, best of $REPEATS, $(nproc) CPUs"
echo
printf '| workload | colo-blk ops/s | qsd aio=threads ops/s | qsd aio=io_uring ops/s | ratio vs best qsd |\n'
printf '|---|---:|---:|---:|---:|\n'
for w in "${WORKLOADS[@]}"; do
    name=${w%%|*}
    args=${w#*|}
    count=$(sed -E 's/.*-c ([0-9]+).*/\1/' <<<"$args")
    # Interleave the servers so that machine noise hits all of them alike;
    # the best run of each counts.
    t_colo=999999 t_thr=999999 t_uring=999999
    for _ in $(seq "$REPEATS"); do
        t_colo=$(min "$t_colo" "$(run_time "$DIR/colo.sock" "$args")")
        t_thr=$(min "$t_thr" "$(run_time "$DIR/qsd-threads.sock" "$args")")
        t_uring=$(min "$t_uring" "$(run_time "$DIR/qsd-io_uring.sock" "$args")")
    done
    best_q=$(min "$t_thr" "$t_uring")
    ratio=$(echo "$best_q / $t_colo" | bc -l | xargs printf '%.2f')
    printf '| %s | %s | %s | %s | %sx |\n' "$name" \
        "$(ops_of "$count" "$t_colo")" "$(ops_of "$count" "$t_thr")" \
        "$(ops_of "$count" "$t_uring")" "$ratio"
done
