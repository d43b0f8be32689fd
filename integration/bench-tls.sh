#!/usr/bin/env bash
# What TLS costs on the replication link, in one run, on tmpfs images:
#   a. guest writes (`colo-blk bench`, libblkio) through a primary forwarding to a
#      colo-blk secondary over TCP loopback, plain and with NBD over TLS
#      (--tls-creds-x509, credentials from integration/tls/make-certs.sh), and
#      with pre-shared keys (--tls-creds-psk: GnuTLS, as QEMU);
#   b. the same primary over TLS into qemu-nbd with QEMU's TLS (GnuTLS) as the
#      secondary-side server;
#   c. QEMU alone: the same guest workloads through qemu-storage-daemon's
#      vhost-user-blk export of an NBD node with tls-creds, into qemu-nbd with
#      TLS (QEMU's TLS NBD client and server, GnuTLS; no local disk write).
# Workloads: randwrite-4k-qd32 and seqwrite-1m-qd8. Each configuration's best round
# counts (rounds interleave them, so load from other processes hits all alike).
# A benchmark, not a test: it prints ratios and fails only on wrong results (every
# forwarded write must be on the secondary disk: compared byte for byte).
#
#   BENCH_SECONDS   seconds per guest workload (default 3)
#   BENCH_ROUNDS    rounds (default 2)
#   BENCH_SIZE_MB   guest image size in MiB (default 256)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${BENCH_SECONDS:-3}
rounds=${BENCH_ROUNDS:-2}
size_mb=${BENCH_SIZE_MB:-256}
workloads=seqwrite-1m-qd8,randwrite-4k-qd32

. integration/bench-lib.sh
bench_init tls-bench
bench_need qemu-nbd qemu-storage-daemon cmp openssl python3

img=$work/disk.img
sec=$work/sec.img
bash integration/tls/make-certs.sh "$work/certs" >/dev/null
certs=$work/certs
: >"$work/results"
echo "== guest image: $size_mb MiB of random data ($work)"
dd if=/dev/urandom of="$img" bs=1M count="$size_mb" status=none

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {
  for _ in $(seq 1 1000); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$bench_pid" 2>/dev/null || { echo "server exited early:" >&2; cat "${bench_logs[$bench_pid]}" >&2; return 1; }
    sleep 0.01
  done
  echo "nothing listens on $1" >&2
  return 1
}

guest_bench() {
  "$bin" bench --socket "$2" --seconds "$seconds" --workloads "$workloads" >"$work/bench.out"
  grep -v '^RESULT' "$work/bench.out" | sed "s/^/  [$1] /"
  awk -v t="$1" '$1=="RESULT" { print t, $2, $3, $5, $6 }' "$work/bench.out" >>"$work/results"
}

# run_primary TAG SERVER(colo|qemu) TLS(0|x509|psk)
run_primary() {
  local tag=$1 server=$2 tls=$3 port sec_pid pri_pid
  local stls=() ptls=()
  port=$(free_port)
  cp "$img" "$sec"
  rm -f "$work"/*.sock "$sec.active" "$sec.hidden"
  if [ "$tls" = x509 ]; then
    stls=(--tls-creds-x509 "$certs/server" --tls-authz "C=GB,O=Example,CN=client")
    ptls=(--tls-creds-x509 "$certs/client")
  elif [ "$tls" = psk ]; then
    stls=(--tls-creds-psk "$certs/psk" --tls-authz primary)
    ptls=(--tls-creds-psk "$certs/psk-client" --tls-psk-username primary)
  fi
  if [ "$server" = colo ]; then
    bench_start secondary "$bin" serve --socket "$work/sec-vhost.sock" --disk "$sec" --num-queues 1 \
      --mode secondary --nbd-listen "tcp:127.0.0.1:$port" --control "$work/sec-ctl.sock" "${stls[@]}"
    sec_pid=$bench_pid
    wait_port "$port"
    bench_wait_socket "$work/sec-ctl.sock"
    "$bin" ctl --control "$work/sec-ctl.sock" start >/dev/null
  else
    bench_start qemu-nbd qemu-nbd --object "tls-creds-x509,id=tls0,dir=$certs/server,endpoint=server" \
      --tls-creds tls0 -b 127.0.0.1 -p "$port" -f raw -x parent0 -t -e 4 "$sec"
    sec_pid=$bench_pid
    wait_port "$port"
  fi
  bench_start primary "$bin" serve --socket "$work/vhost.sock" --disk "$img" --num-queues 1 \
    --mode primary --secondary "nbd://127.0.0.1:$port/parent0" --control "$work/pri-ctl.sock" "${ptls[@]}"
  pri_pid=$bench_pid
  bench_wait_socket "$work/vhost.sock"
  bench_wait_socket "$work/pri-ctl.sock"
  "$bin" ctl --control "$work/pri-ctl.sock" start --sync none >/dev/null
  guest_bench "$tag" "$work/vhost.sock"
  "$bin" ctl --control "$work/pri-ctl.sock" get-error >/dev/null ||
    { echo "[$tag] forwarding failed:" >&2; "$bin" ctl --control "$work/pri-ctl.sock" get-error >&2; exit 1; }
  if [ "$tls" != 0 ] && [ "$server" = colo ]; then
    grep -q "TLS established" "${bench_logs[$sec_pid]}" || { echo "[$tag] the link is not TLS" >&2; exit 1; }
  fi
  bench_stop "$pri_pid"
  bench_stop "$sec_pid"
  cmp -s "$img" "$sec" || { echo "[$tag] secondary disk differs from the primary disk" >&2; exit 1; }
  echo "  [$tag] secondary disk equals the primary disk"
}

# qemu_alone: the same guest workloads through QEMU's own TLS NBD path:
# qemu-storage-daemon exports a vhost-user-blk disk whose node is an NBD client
# with tls-creds (endpoint=client), into qemu-nbd with TLS (endpoint=server).
qemu_alone() {
  local port qpid spid
  port=$(free_port)
  cp "$img" "$sec"
  rm -f "$work/qsd.sock"
  bench_start qemu-nbd qemu-nbd --object "tls-creds-x509,id=tls0,dir=$certs/server,endpoint=server" \
    --tls-creds tls0 -b 127.0.0.1 -p "$port" -f raw -x parent0 -t -e 4 "$sec"
  qpid=$bench_pid
  wait_port "$port"
  bench_start qsd qemu-storage-daemon \
    --object "tls-creds-x509,id=tls0,dir=$certs/client,endpoint=client" \
    --blockdev "driver=nbd,node-name=n0,server.type=inet,server.host=127.0.0.1,server.port=$port,export=parent0,tls-creds=tls0" \
    --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$work/qsd.sock,writable=on"
  spid=$bench_pid
  bench_wait_socket "$work/qsd.sock"
  guest_bench qemu-tls "$work/qsd.sock"
  bench_stop "$spid"
  bench_stop "$qpid"
}

echo "== $(bench_load) before; $seconds s per workload, $rounds round(s)"
for round in $(seq 1 "$rounds"); do
  echo "== round $round"
  run_primary plain-tcp colo 0
  run_primary tls colo x509
  run_primary tls-psk colo psk
  run_primary tls-to-qemu-nbd qemu x509
  qemu_alone
done
echo "== $(bench_load) after"

awk '{ k = $1 " " $2; if (!(k in v) || $3 > v[k]) { v[k] = $3; l[k] = $0 } } END { for (k in l) print l[k] }' \
  "$work/results" >"$work/best"
echo
printf '| %-18s | %12s | %12s | %12s | %16s | %14s | %9s | %9s | %11s |\n' workload "plain TCP" "TLS" "TLS-PSK" "TLS->qemu-nbd" "QEMU TLS alone" "TLS/plain" "PSK/plain" "TLS/QEMU"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' "--------------------" "--------------" "--------------" "--------------" "------------------" "----------------" "-----------" "-----------" "-------------"
for w in ${workloads//,/ }; do
  awk -v w="$w" '
    $2==w { v[$1]=$3 }
    END { printf "| %-18s | %12d | %12d | %12d | %16d | %14d | %8.2fx | %8.2fx | %10.2fx |\n", w,
      v["plain-tcp"], v["tls"], v["tls-psk"], v["tls-to-qemu-nbd"], v["qemu-tls"],
      (v["plain-tcp"] ? v["tls"] / v["plain-tcp"] : 0), (v["plain-tcp"] ? v["tls-psk"] / v["plain-tcp"] : 0),
      (v["qemu-tls"] ? v["tls"] / v["qemu-tls"] : 0) }' "$work/best"
done
echo "(IOPS, best of $rounds rounds; TLS: x509 on rustls, TLS-PSK: pre-shared keys on GnuTLS; TLS/QEMU: colo-blk primary over x509 TLS vs qemu-storage-daemon over QEMU's TLS NBD)"
