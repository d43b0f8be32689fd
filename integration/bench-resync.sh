#!/usr/bin/env bash
# Resync over TCP between two "hosts": network namespaces on a veth link
# (created here, removed on every exit path). The secondary (stage none, a
# fresh empty disk) listens on host B; on host A, in the same run:
#   a. `ctl start --sync full` of a colo-blk primary, timed until
#      query-replication shows done == total;
#   b. `qemu-img convert -n` of the same image into the same NBD export.
# The image is all random data (no holes to skip). Rounds alternate a and b;
# each side's best round counts. Prints the throughput ratio resync/convert.
# A benchmark, not a test: it never fails on numbers, only on wrong results
# (both copies are compared byte for byte). Needs root (ip netns).
#
#   BENCH_RESYNC_MB  image size in MiB (default 1024)
#   BENCH_ROUNDS     rounds (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

size_mb=${BENCH_RESYNC_MB:-1024}
rounds=${BENCH_ROUNDS:-3}

. integration/bench-lib.sh
bench_init resync-bench
bench_need qemu-img cmp ip

tag=$$
nsa=cbrA$tag nsb=cbrB$tag
ipa=10.251.$((tag % 250)).1 ipb=10.251.$((tag % 250)).2
netns_cleanup() {
  bench_cleanup
  ip netns del "$nsa" 2>/dev/null || true
  ip netns del "$nsb" 2>/dev/null || true
}
trap netns_cleanup EXIT
ip netns add "$nsa"
ip netns add "$nsb"
ip link add "ra$tag" netns "$nsa" type veth peer name "rb$tag" netns "$nsb"
ip -n "$nsa" addr add "$ipa/24" dev "ra$tag"
ip -n "$nsb" addr add "$ipb/24" dev "rb$tag"
for ns in "$nsa" "$nsb"; do
  ip -n "$ns" link set lo up
done
ip -n "$nsa" link set "ra$tag" up
ip -n "$nsb" link set "rb$tag" up

img=$work/src.img
sec=$work/sec.img
echo "== image: $size_mb MiB of random data ($work); link: veth between two netns"
head -c "${size_mb}M" /dev/urandom >"$img"

fresh_target() {
  rm -f "$sec" "$sec.active" "$sec.hidden"
  truncate -s "${size_mb}M" "$sec"
}

start_secondary() {
  bench_start secondary ip netns exec "$nsb" "$bin" serve --mode secondary \
    --socket "$work/sec-vhost.sock" --disk "$sec" --control "$work/sec-ctl.sock" \
    --nbd-listen "tcp:$ipb:10809" --nbd-insecure
  sec_pid=$bench_pid
  bench_wait_socket "$work/sec-ctl.sock"
  # The control socket appears last but one; the NBD listener is up before serve runs.
  sleep 0.2
}

check_copy() {
  cmp -s "$img" "$sec" || { echo "[$1] the copy differs from the source" >&2; exit 1; }
}

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
  start_secondary
  bench_start primary ip netns exec "$nsa" "$bin" serve --mode primary \
    --socket "$work/pri-vhost.sock" --disk "$img" --control "$work/pri-ctl.sock" \
    --secondary "nbd://$ipb:10809/parent0"
  pri_pid=$bench_pid
  bench_wait_socket "$work/pri-ctl.sock"
  t0=$(bench_now_ns)
  "$bin" ctl --control "$work/pri-ctl.sock" start --sync full >/dev/null
  # Polled at 20 Hz: each poll is a process, and the machine may have 2 CPUs.
  for _ in $(seq 1 12000); do
    read -r done total error < <(resync_status "$work/pri-ctl.sock")
    [ "$error" = null ] || { echo "[resync] failed: $error" >&2; exit 1; }
    [ "$total" != - ] && [ "$done" = "$total" ] && break
    sleep 0.05
  done
  t1=$(bench_now_ns)
  echo "  [colo-blk resync] primary CPU $(awk '{print ($14+$15)*10}' /proc/$pri_pid/stat) ms, secondary CPU $(awk '{print ($14+$15)*10}' /proc/$sec_pid/stat) ms"

  bench_stop "$pri_pid"
  bench_stop "$sec_pid"
  check_copy resync
  echo "resync $(( (t1 - t0) / 1000 ))" >>"$work/times"
  echo "  [colo-blk resync] $(( (t1 - t0) / 1000000 )) ms, copy equal"
}

run_convert() {
  local t0 t1
  fresh_target
  start_secondary
  t0=$(bench_now_ns)
  ip netns exec "$nsa" qemu-img convert -n -f raw -O raw "$img" "nbd://$ipb:10809/parent0"
  t1=$(bench_now_ns)
  bench_stop "$sec_pid"
  check_copy convert
  echo "convert $(( (t1 - t0) / 1000 ))" >>"$work/times"
  echo "  [qemu-img convert -n] $(( (t1 - t0) / 1000000 )) ms, copy equal"
}

echo "== $(bench_load) before; $rounds round(s)"
: >"$work/times"
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  run_resync
  run_convert
done
best() { awk -v k="$1" '$1 == k { if (!m || $2 < m) m = $2 } END { print m }' "$work/times"; }
r=$(best resync) c=$(best convert)
echo "== best of $rounds: colo-blk resync $((r / 1000)) ms, qemu-img convert -n $((c / 1000)) ms"
awk -v r="$r" -v c="$c" -v mb="$size_mb" 'BEGIN {
  printf "RESULT resync-tcp %d MiB: colo-blk %.0f MiB/s, qemu-img convert %.0f MiB/s, ratio %.2fx\n",
    mb, mb / (r / 1e6), mb / (c / 1e6), c / r }'
echo "== $(bench_load) after"
