# disk: the host made an ext4 file system on the first 48 MiB of the image; the
# rest is raw. The guest writes files through the file system, trims, and drives
# plain writes, discard and write-zeroes on the raw part. The host checks the image
# after the VM is gone (see run.py).
disk_identity || return

# Raw part: MiB 52-56 data, 56-60 discarded, 60-64 zeroed.
dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
want="$(md5sum </tmp/pattern | cut -d' ' -f1)"
check "raw-write" dd if=/tmp/pattern of=/dev/vda bs=1M seek=52 oflag=direct conv=fsync
expect "raw-read-back" "$(read_md5 52 4)" "$want"
info raw_md5 "$want"

check "raw-fill-discard-region" dd if=/tmp/pattern of=/dev/vda bs=1M seek=56 oflag=direct conv=fsync
check "raw-fill-zero-region" dd if=/tmp/pattern of=/dev/vda bs=1M seek=60 oflag=direct conv=fsync
if [ "$(cat /sys/block/vda/queue/discard_max_bytes)" -gt 0 ]; then
  ok "discard-offered"
  check "blkdiscard" blkdiscard -o $((56 << 20)) -l $((4 << 20)) /dev/vda
  expect "discarded-reads-zero" "$(read_md5 56 4)" "$(zero_md5 4)"
else
  fail "discard-offered" "discard_max_bytes is 0"
fi
if [ "$(cat /sys/block/vda/queue/write_zeroes_max_bytes)" -gt 0 ]; then
  ok "write-zeroes-offered"
  check "blkzeroout" blkzero /dev/vda $((60 << 20)) $((4 << 20))
  expect "zeroed-reads-zero" "$(read_md5 60 4)" "$(zero_md5 4)"
else
  fail "write-zeroes-offered" "write_zeroes_max_bytes is 0"
fi

# File system part.
mkdir -p /mnt
check "mount-ext4" mount -t ext4 /dev/vda /mnt || return
echo "hello from the guest" >/mnt/hello.txt
mkdir -p /mnt/dir
dd if=/dev/urandom of=/mnt/dir/data.bin bs=64k count=16 2>/dev/null
info data_md5 "$(md5sum </mnt/dir/data.bin | cut -d' ' -f1)"
check "sync-files" sync
# Trash that is deleted again: trimming must hand its blocks back to the host.
dd if=/dev/urandom of=/mnt/trash bs=1M count=24 2>/dev/null
check "sync-trash" sync
rm /mnt/trash
sync
if trimmed="$(fstrim -v /mnt 2>&1)"; then
  ok "fstrim"
  info fstrim "$(echo "$trimmed" | tr ' ' '_')"
else
  fail "fstrim" "$trimmed"
fi
# Read back through a cold cache.
echo 3 >/proc/sys/vm/drop_caches
expect "file-read-back" "$(cat /mnt/hello.txt)" "hello from the guest"
check "umount" umount /mnt
