# colo_secondary: the secondary VM of a COLO pair, running while replication runs.
# It mounts nothing and writes nothing; on each host command read-LABEL it reads
# the whole disk with O_DIRECT and reports its md5 as LABEL, so the host can check
# that the secondary guest sees the disk of the last checkpoint, never a primary
# write made after it. The command stop ends it.
disk_identity || return
mib=$((ARG_size >> 20))
while :; do
  echo "GUEST-WAIT command"
  read -r cmd || break
  case "$cmd" in
    read-*) info "${cmd#read-}" "$(read_md5 0 "$mib")" ;;
    stop) break ;;
    *) fail "command" "unknown '$cmd'" ;;
  esac
done
