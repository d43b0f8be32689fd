#!/usr/bin/env bash
# ocf-tester (Debian resource-agents) on the colo-blk agent: meta-data,
# validate-all, start/stop (twice each), monitor in every state, notify, and
# for a promotable agent promote/demote (twice each), against a real
# `colo-blk serve` on a sparse image. Promote of a started (replicating)
# secondary is a real failover commit; demote restarts it as a secondary.
#
# Usage: integration/ocf/test-ocf-tester.sh [path/to/colo-blk]
# Exit 0 only when ocf-tester passed; 77 (skip) when ocf-tester is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "${1:-$here/../../target/release/colo-blk}")

if ! command -v ocf-tester >/dev/null; then
  echo "test-ocf-tester: SKIPPED: ocf-tester not installed (apt-get install resource-agents)"
  exit 77
fi
[ -x "$bin" ] || { echo "test-ocf-tester: no binary at $bin (cargo build --release)"; exit 1; }

dir=$(mktemp -d /tmp/colo-ocf.XXXXXX)
cleanup() {
  # The agent's own stop; then make sure nothing of ours is left.
  OCF_ROOT=/usr/lib/ocf OCF_RESOURCE_INSTANCE=colo-ocf-test __OCF_ACTION=stop \
    OCF_RESKEY_binary="$bin" OCF_RESKEY_disk="$dir/disk.img" OCF_RESKEY_socket="$dir/vhost.sock" \
    OCF_RESKEY_control="$dir/ctl.sock" "$here/colo-blk" stop >/dev/null 2>&1 || true
  # Whatever still serves this test's disk (a failed run): by pid.
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "--disk $dir/disk.img "; then
      kill -TERM "${p#/proc/}" 2>/dev/null || true
    fi
  done
  rm -rf "$dir"
}
trap cleanup EXIT
truncate -s 64M "$dir/disk.img"

# Bounded: ocf-tester runs ~20 actions, each bounded by the agent; 180 s is
# far above what it needs here (about 15 s).
set +e
timeout 180 ocf-tester -v -n colo-ocf-test \
  -o binary="$bin" \
  -o disk="$dir/disk.img" \
  -o socket="$dir/vhost.sock" \
  -o control="$dir/ctl.sock" \
  -o nbd_listen="unix:$dir/nbd.sock" \
  -o logfile="$dir/serve.log" \
  "$here/colo-blk" >"$dir/ocf-tester.out" 2>&1
rc=$?
set -e
cat "$dir/ocf-tester.out"
if [ $rc -ne 0 ]; then
  echo "--- serve log"
  tail -n 40 "$dir/serve.log" || true
  echo "test-ocf-tester: FAILED (ocf-tester exit $rc)"
  exit 1
fi
# ocf-tester must have exercised promote and demote, not skipped them.
if grep -q "does not support the \(promote\|demote\)" "$dir/ocf-tester.out"; then
  echo "test-ocf-tester: FAILED: promote/demote were not tested"
  exit 1
fi
grep -q "failing over" "$dir/serve.log" "$dir/ocf-tester.out" 2>/dev/null || true
echo "test-ocf-tester: PASSED"
