# Helpers shared by the guest cases (sourced by /init; busybox ash).
PASS=0
FAIL=0

ok() {
  PASS=$((PASS + 1))
  echo "GUEST-CHECK ok $1"
}

fail() {
  FAIL=$((FAIL + 1))
  echo "GUEST-CHECK FAIL $1: $2"
}

# check NAME COMMAND...: the command's exit status is the verdict (and returned).
check() {
  name="$1"
  shift
  if out="$("$@" 2>&1)"; then
    ok "$name"
  else
    fail "$name" "$(echo "$out" | tail -n 3 | tr '\n' ' ')"
    return 1
  fi
}

# expect NAME GOT WANT
expect() {
  if [ "$2" = "$3" ]; then ok "$1"; else fail "$1" "got '$2', want '$3'"; return 1; fi
}

info() { echo "GUEST-INFO $1=$2"; }

# wait_host TOKEN: hand control to the host runner until it types TOKEN back.
wait_host() {
  echo "GUEST-WAIT $1"
  while read -r line; do
    [ "$line" = "$1" ] && return 0
  done
  fail "wait-$1" "console closed"
  return 1
}

# wait_disk: the device node appears shortly after virtio_blk probes.
wait_disk() {
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
  done
  [ -b /dev/vda ]
}

# read_md5 OFFSET LEN: md5 of a byte range of /dev/vda, read with O_DIRECT so the
# data comes from the backend, not the page cache. OFFSET and LEN in MiB.
read_md5() {
  dd if=/dev/vda bs=1M skip="$1" count="$2" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
}

zero_md5() {
  dd if=/dev/zero bs=1M count="$1" 2>/dev/null | md5sum | cut -d' ' -f1
}

# disk_identity: size, serial and queue count against the host's expectations.
disk_identity() {
  if ! wait_disk; then
    fail "disk-present" "/dev/vda did not appear"
    return 1
  fi
  ok "disk-present"
  expect "disk-size" "$(($(cat /sys/block/vda/size) * 512))" "$ARG_size"
  if [ -n "$ARG_serial" ]; then
    expect "disk-serial" "$(cat /sys/block/vda/serial 2>/dev/null)" "$ARG_serial"
  fi
  expect "disk-read-only-flag" "$(cat /sys/block/vda/ro)" "${ARG_ro:-0}"
  if [ -n "$ARG_queues" ]; then
    expect "disk-queues" "$(ls /sys/block/vda/mq | wc -l)" "$ARG_queues"
  fi
  return 0
}

finish() {
  echo "GUEST-DONE passed=$PASS failed=$FAIL"
  sync
  poweroff -f
}
