# reconnect: the host kills the backend while the guest idles with the file system
# mounted, starts a new one on the same socket; QEMU reconnects and the guest
# carries on reading and writing.
disk_identity || return
mkdir -p /mnt
check "mount-ext4" mount -t ext4 /dev/vda /mnt || return
echo "written before the restart" >/mnt/before.txt
check "sync-before" sync
dd if=/dev/urandom of=/tmp/pattern bs=1M count=2 2>/dev/null
check "raw-write-before" dd if=/tmp/pattern of=/dev/vda bs=1M seek=56 oflag=direct conv=fsync

wait_host reconnect || return

expect "raw-read-after" "$(read_md5 56 2)" "$(md5sum </tmp/pattern | cut -d' ' -f1)"
echo 3 >/proc/sys/vm/drop_caches
expect "file-read-after" "$(cat /mnt/before.txt)" "written before the restart"
echo "written after the restart" >/mnt/after.txt
check "sync-after" sync
check "raw-write-after" dd if=/tmp/pattern of=/dev/vda bs=1M seek=60 oflag=direct conv=fsync
info raw_md5 "$(md5sum </tmp/pattern | cut -d' ' -f1)"
check "umount" umount /mnt
