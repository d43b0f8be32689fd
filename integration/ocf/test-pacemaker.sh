#!/usr/bin/env bash
# A one-node Pacemaker cluster runs the colo-blk agent as a promotable clone:
# Pacemaker starts it (a replicating secondary), promotes it (the monitor's
# crm_master score asks for it: a real failover commit), demotes it back when
# the clone is told target-role=Unpromoted (restart as a secondary,
# replication running again), and stops it.
#
# Corosync and Pacemaker run in private mount and network namespaces made by
# this script: the cluster's state directories are tmpfs, corosync talks on
# the namespace's own loopback, the agent is installed on a tmpfs over
# /usr/lib/ocf/resource.d. Nothing outside the namespace changes.
#
# Usage: integration/ocf/test-pacemaker.sh [path/to/colo-blk]
# Exit 0: every step seen; 1: a step failed; 77: cannot run here (the reason
# is printed; nothing was tested).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "${1:-$here/../../target/release/colo-blk}")

skip() { echo "test-pacemaker: SKIPPED (not run, not passed): $*"; exit 77; }
for c in corosync pacemakerd cibadmin crm_mon crm_resource unshare; do
  command -v "$c" >/dev/null || skip "$c not installed (apt-get install pacemaker corosync)"
done
[ "$(id -u)" = 0 ] || skip "needs root for its mount and network namespaces"
[ -x "$bin" ] || { echo "test-pacemaker: no binary at $bin"; exit 1; }
id hacluster >/dev/null 2>&1 || skip "no hacluster user (the pacemaker package creates it)"

if [ "${COLO_PCMK_INNER:-}" != 1 ]; then
  # Re-run inside fresh namespaces; the whole test is bounded.
  dir=$(mktemp -d /tmp/colo-pcmk.XXXXXX)
  set +e
  COLO_PCMK_INNER=1 COLO_PCMK_DIR="$dir" timeout -k 10 240 \
    unshare --mount --propagation private --net "$0" "$bin"
  rc=$?
  set -e
  if [ $rc -ne 0 ] && [ $rc -ne 77 ]; then
    echo "--- corosync log"; tail -n 30 "$dir/corosync.log" 2>/dev/null || true
    echo "--- pacemaker log (agent lines)"; grep -i 'colo' "$dir/pacemaker.log" 2>/dev/null | tail -n 40 || true
    echo "--- serve log"; tail -n 30 "$dir/serve.log" 2>/dev/null || true
  fi
  rm -rf "$dir"
  [ $rc -eq 124 ] && echo "test-pacemaker: FAILED: timed out"
  exit $rc
fi

# --- inside the namespaces ----------------------------------------------------
dir=$COLO_PCMK_DIR
log() { printf 'test-pacemaker: %s\n' "$*"; }
ip link set lo up

for d in /var/lib/pacemaker /var/lib/corosync /var/log/pacemaker \
         /etc/corosync /usr/lib/ocf/resource.d /run/resource-agents; do
  # Created on the host only when missing (empty directories the packages own).
  mkdir -p "$d"
  mount -t tmpfs -o mode=0755 tmpfs "$d"
done
mkdir -p /var/lib/pacemaker/{cib,pengine,blackbox,cores}
chown -R hacluster:haclient /var/lib/pacemaker /var/log/pacemaker
chmod 0750 /var/lib/pacemaker/cib
mkdir -p /usr/lib/ocf/resource.d/colo
cp "$here/colo-blk" /usr/lib/ocf/resource.d/colo/colo-blk
chmod 0755 /usr/lib/ocf/resource.d/colo/colo-blk

cat >/etc/corosync/corosync.conf <<EOF
totem {
    version: 2
    cluster_name: colo-test
    transport: knet
    crypto_cipher: none
    crypto_hash: none
}
nodelist {
    node {
        ring0_addr: 127.0.0.1
        name: node1
        nodeid: 1
    }
}
quorum {
    provider: corosync_votequorum
}
logging {
    to_logfile: yes
    logfile: $dir/corosync.log
    to_stderr: no
    to_syslog: no
}
EOF

pids=()
# shellcheck disable=SC2317 # run by the EXIT trap
stop_all() {
  # Pacemaker first (it stops the resource), then corosync; by pid.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "${pids[$i]}" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "${pids[$i]}" 2>/dev/null || true
  done
  # The agent's serve process, if Pacemaker could not stop it.
  for f in /run/resource-agents/colo-blk/*.pid; do
    if [ -s "$f" ]; then kill -KILL "$(cat "$f")" 2>/dev/null || true; fi
  done
}
trap stop_all EXIT

corosync -f >"$dir/corosync.out" 2>&1 &
pids+=($!)
ok=0
for _ in $(seq 1 100); do
  if corosync-quorumtool -s >/dev/null 2>&1; then ok=1; break; fi
  kill -0 "${pids[0]}" 2>/dev/null || break
  sleep 0.2
done
if [ $ok -ne 1 ]; then
  cat "$dir/corosync.out" "$dir/corosync.log" 2>/dev/null | tail -n 20
  skip "corosync did not form a one-node membership on loopback here (output above)"
fi
log "corosync up: $(corosync-quorumtool -s 2>/dev/null | grep -E 'Quorate|Nodes' | tr -s ' ' | tr '\n' ' ')"

PCMK_logfile="$dir/pacemaker.log" PCMK_debug=no pacemakerd -f >"$dir/pacemakerd.out" 2>&1 &
pids+=($!)
ok=0
for _ in $(seq 1 300); do
  if crm_mon -1 2>/dev/null | grep -q 'Online: \[ node1 \]'; then ok=1; break; fi
  kill -0 "${pids[1]}" 2>/dev/null || break
  sleep 0.2
done
if [ $ok -ne 1 ]; then
  tail -n 20 "$dir/pacemakerd.out" "$dir/pacemaker.log" 2>/dev/null
  skip "pacemaker did not bring node1 online within 60 s here (output above)"
fi
log "pacemaker up: node1 online"

crm_attribute --type crm_config --name stonith-enabled --update false
crm_attribute --type crm_config --name no-quorum-policy --update ignore
truncate -s 64M "$dir/disk.img"
cibadmin --create --scope resources --xml-text "
<clone id=\"colo-clone\">
  <meta_attributes id=\"colo-clone-meta\">
    <nvpair id=\"colo-clone-promotable\" name=\"promotable\" value=\"true\"/>
    <nvpair id=\"colo-clone-promoted-max\" name=\"promoted-max\" value=\"1\"/>
    <nvpair id=\"colo-clone-clone-max\" name=\"clone-max\" value=\"1\"/>
    <nvpair id=\"colo-clone-notify\" name=\"notify\" value=\"true\"/>
  </meta_attributes>
  <primitive id=\"colo\" class=\"ocf\" provider=\"colo\" type=\"colo-blk\">
    <instance_attributes id=\"colo-params\">
      <nvpair id=\"colo-binary\" name=\"binary\" value=\"$bin\"/>
      <nvpair id=\"colo-disk\" name=\"disk\" value=\"$dir/disk.img\"/>
      <nvpair id=\"colo-socket\" name=\"socket\" value=\"$dir/vhost.sock\"/>
      <nvpair id=\"colo-control\" name=\"control\" value=\"$dir/ctl.sock\"/>
      <nvpair id=\"colo-nbd-listen\" name=\"nbd_listen\" value=\"unix:$dir/nbd.sock\"/>
      <nvpair id=\"colo-logfile\" name=\"logfile\" value=\"$dir/serve.log\"/>
    </instance_attributes>
    <operations>
      <op id=\"colo-mon-p\" name=\"monitor\" interval=\"3s\" role=\"Promoted\" timeout=\"30s\"/>
      <op id=\"colo-mon-u\" name=\"monitor\" interval=\"4s\" role=\"Unpromoted\" timeout=\"30s\"/>
      <op id=\"colo-promote\" name=\"promote\" interval=\"0s\" timeout=\"120s\"/>
    </operations>
  </primitive>
</clone>"
log "clone colo-clone configured"

ctl_json() { "$bin" ctl --control "$dir/ctl.sock" --json status 2>/dev/null || true; }
# Waits (bounded) until crm_mon shows the role and the daemon the stage.
wait_for() {
  role=$1 stage=$2 what=$3
  for _ in $(seq 1 300); do
    mon=$(crm_mon -1 -r 2>/dev/null || true)
    st=$(ctl_json)
    if printf '%s' "$mon" | grep -Eq "\* $role( \([^)]*\))?: \[ node1 \]" &&
       printf '%s' "$st" | grep -q "\"stage\":\"$stage\""; then
      log "$what: crm_mon says $role; daemon: $st"
      return 0
    fi
    sleep 0.2
  done
  log "FAILED: $what: no $role / stage $stage within 60 s"
  printf '%s\n' "$mon"; printf 'daemon: %s\n' "$st"
  exit 1
}

# 1. Started as the secondary, scored, and promoted: failover in place.
wait_for Promoted "done" "promoted (secondary failed over)"
grep -q "failing over" "$dir/pacemaker.log" ||
  { log "FAILED: no failover in the agent's log"; exit 1; }

# 2. Demoted back: restarted as a replicating secondary.
crm_resource --resource colo-clone --meta --set-parameter target-role --parameter-value Unpromoted
wait_for Unpromoted running "demoted (secondary, replicating again)"
st=$(ctl_json)
printf '%s' "$st" | grep -q '"mode":"secondary"' || { log "FAILED: not a secondary: $st"; exit 1; }

# 3. Stopped: the serve process is gone.
crm_resource --resource colo-clone --meta --set-parameter target-role --parameter-value Stopped
for _ in $(seq 1 150); do
  if crm_mon -1 -r 2>/dev/null | grep -Eq '\* Stopped( \(disabled\))?: \[ node1 \]'; then
    if [ ! -S "$dir/ctl.sock" ]; then
      log "stopped: resource Stopped, control socket removed"
      log "PASSED"
      exit 0
    fi
  fi
  sleep 0.2
done
log "FAILED: the resource did not stop"
crm_mon -1 -r || true
exit 1
