# resize: the host grows the disk online (colo-blk ctl resize) while the guest
# runs. colo-blk sends QEMU a config-change message on the backend request
# channel, QEMU re-reads the config space and raises a config interrupt, and the
# guest's virtio_blk driver picks up the new capacity: no reboot, no rescan. The
# guest then writes and reads past the old end.
disk_identity || return
old_mib=$((ARG_size >> 20))
new_mib=$((ARG_newsize >> 20))

# The last MiB of the old disk, to check it survives the resize.
dd if=/dev/urandom of=/tmp/end bs=1M count=1 2>/dev/null
check "write-old-end" dd if=/tmp/end of=/dev/vda bs=1M seek=$((old_mib - 1)) oflag=direct conv=fsync
dd if=/dev/urandom of=/tmp/past bs=1M count=1 2>/dev/null
if dd if=/tmp/past of=/dev/vda bs=1M seek="$old_mib" oflag=direct conv=fsync 2>/dev/null; then
  fail "write-past-old-end-refused" "a write past the end succeeded before the resize"
else
  ok "write-past-old-end-refused"
fi

wait_host resize || return

# The config interrupt is handled by a kernel work item: give it a moment.
i=0
while [ "$(cat /sys/block/vda/size)" -ne $((ARG_newsize / 512)) ] && [ $i -lt 100 ]; do
  sleep 0.1
  i=$((i + 1))
done
info seen_after_ms $((i * 100))
expect "new-size-seen" "$(($(cat /sys/block/vda/size) * 512))" "$ARG_newsize"
said="$(dmesg | grep -E 'new size|capacity change' | tr '\n' ' ' | tr -s ' ')"
info kernel_said "$said"
case "$said" in
  *"capacity change"*) ok "kernel-logged-capacity-change" ;;
  *) fail "kernel-logged-capacity-change" "dmesg: $said" ;;
esac

check "write-past-old-end" dd if=/tmp/past of=/dev/vda bs=1M seek="$old_mib" oflag=direct conv=fsync
expect "read-past-old-end" "$(read_md5 "$old_mib" 1)" "$(md5sum </tmp/past | cut -d' ' -f1)"
check "write-new-last-mib" dd if=/tmp/past of=/dev/vda bs=1M seek=$((new_mib - 1)) oflag=direct conv=fsync
expect "read-new-last-mib" "$(read_md5 $((new_mib - 1)) 1)" "$(md5sum </tmp/past | cut -d' ' -f1)"
expect "old-end-intact" "$(read_md5 $((old_mib - 1)) 1)" "$(md5sum </tmp/end | cut -d' ' -f1)"
if dd if=/tmp/past of=/dev/vda bs=1M seek="$new_mib" oflag=direct conv=fsync 2>/dev/null; then
  fail "write-past-new-end-refused" "a write past the new end succeeded"
else
  ok "write-past-new-end-refused"
fi
info end_md5 "$(md5sum </tmp/end | cut -d' ' -f1)"
info past_md5 "$(md5sum </tmp/past | cut -d' ' -f1)"
