#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine (root, package registries
# only). Idempotent: skips what is already there.
set -euo pipefail

need_apt=()
command -v qemu-img >/dev/null || need_apt+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null || need_apt+=(qemu-system-common)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
fi

# The control-socket test drives colo-blk with the stock QMP client library.
python3 -c 'import qemu.qmp' 2>/dev/null || pip install --quiet --root-user-action=ignore qemu.qmp
