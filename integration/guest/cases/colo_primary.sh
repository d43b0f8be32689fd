# colo_primary: the primary VM of a COLO pair. For each round it writes files,
# freezes the file system (the quiesced state a checkpoint captures) and lets the
# host take the checkpoint; after the last one it changes the file system again,
# never checkpointed, and waits for the host to kill it with its backend.
disk_identity || return
mkdir -p /mnt
check "mount-ext4" mount -t ext4 /dev/vda /mnt || return
k=1
while [ "$k" -le "$ARG_rounds" ]; do
  echo "checkpoint $k" >"/mnt/ckpt-$k.txt"
  dd if=/dev/urandom of="/mnt/data-$k.bin" bs=64k count=8 2>/dev/null
  info "md5_$k" "$(md5sum <"/mnt/data-$k.bin" | cut -d' ' -f1)"
  check "freeze-$k" fsfreeze --freeze /mnt || return
  wait_host "checkpoint-$k" || return
  check "thaw-$k" fsfreeze --unfreeze /mnt || return
  k=$((k + 1))
done
# After the last checkpoint: new files and a deletion that failover must undo.
echo "never checkpointed" >/mnt/uncheckpointed.txt
dd if=/dev/urandom of=/mnt/uncheckpointed.bin bs=1M count=2 2>/dev/null
rm /mnt/data-1.bin
check "sync-uncheckpointed" sync
wait_host crash
