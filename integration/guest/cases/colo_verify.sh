# colo_verify: booted on the promoted secondary after failover. The disk must hold
# the file system as it was at the last checkpoint: every checkpointed file intact,
# nothing the primary wrote afterwards. Then the guest writes to it.
disk_identity || return
mkdir -p /mnt
check "mount-ext4" mount -t ext4 /dev/vda /mnt || return
k=1
while [ "$k" -le "$ARG_rounds" ]; do
  expect "ckpt-$k.txt" "$(cat "/mnt/ckpt-$k.txt" 2>&1)" "checkpoint $k"
  eval "want=\$ARG_md5_$k"
  expect "data-$k.bin" "$(md5sum <"/mnt/data-$k.bin" 2>&1 | cut -d' ' -f1)" "$want"
  k=$((k + 1))
done
if [ -e /mnt/uncheckpointed.txt ] || [ -e /mnt/uncheckpointed.bin ]; then
  fail "uncheckpointed-rolled-back" "$(ls /mnt | tr '\n' ' ')"
else
  ok "uncheckpointed-rolled-back"
fi
echo "written after failover" >/mnt/after-failover.txt
check "sync-after-failover" sync
check "umount" umount /mnt
