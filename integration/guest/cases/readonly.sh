# readonly: the backend serves the image read-only. The host put /host.txt in an
# ext4 file system on it and checks afterwards that not a byte changed.
disk_identity || return
mkdir -p /mnt
if check "mount-ro" mount -t ext4 -o ro,noload /dev/vda /mnt; then
  expect "host-file" "$(cat /mnt/host.txt)" "$ARG_expect"
  check "umount" umount /mnt
fi
check "direct-read" dd if=/dev/vda of=/dev/null bs=1M count=4 iflag=direct
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct conv=fsync 2>/dev/null; then
  fail "write-refused" "a write to the read-only disk succeeded"
else
  ok "write-refused"
fi
