# restart_load: O_DIRECT writers reading back, Linux AIO at queue depth 16 and
# 1 MiB readers run on the raw disk (blkstress) while the host SIGKILLs and
# restarts the backend; then every process finishes, every block written is read
# back, and the kernel's log is searched for what a broken ring leaves there.
disk_identity || return
# A request that never completes shows as a hung task well within the run.
if [ -w /proc/sys/kernel/hung_task_timeout_secs ]; then
  echo 10 >/proc/sys/kernel/hung_task_timeout_secs
fi
dmesg -c >/dev/null 2>&1
blkstress /dev/vda "${ARG_hang:-30}" >/tmp/load.log 2>&1 &
load=$!
i=0
while ! grep -q LOAD-STARTED /tmp/load.log && [ $i -lt 1200 ]; do
  sleep 0.1
  i=$((i + 1))
done
if ! grep -q LOAD-STARTED /tmp/load.log; then
  fail "load-started" "$(tail -n 3 /tmp/load.log | tr '\n' ' ')"
  return
fi
ok "load-started"

wait_host kills || return

kill -TERM "$load"
# blkstress gives up on a process stuck longer than its hang bound, so this ends.
wait "$load"
grep '^LOAD' /tmp/load.log | head -n 40
totals="$(grep '^LOAD ops=' /tmp/load.log)"
if [ -z "$totals" ]; then
  fail "load-finished" "no totals: $(tail -n 3 /tmp/load.log | tr '\n' ' ')"
  return
fi
ok "load-finished"
for key in ops errors mismatches hung verified; do
  value="$(echo "$totals" | sed -n "s/.*$key=\([0-9]*\).*/\1/p")"
  info "load_$key" "$value"
  eval "load_$key=\$value"
done
expect "no-io-errors" "$load_errors" 0
expect "no-mismatched-blocks" "$load_mismatches" 0
expect "no-hung-requests" "$load_hung" 0
check "blocks-verified" test "$load_verified" -gt 0
# What the driver logs when the ring breaks, a request fails, or a task waits
# on a request that never comes back.
broken="$(dmesg | grep -E 'is not a head|I/O error|blocked for more than|virtio_blk.*(error|broken)' | head -n 3)"
info "kernel_complaints" "$(dmesg | grep -cE 'is not a head|I/O error|blocked for more than|virtio_blk.*(error|broken)')"
expect "kernel-log-clean" "$broken" ""
