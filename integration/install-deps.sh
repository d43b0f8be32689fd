#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine (root, package registries
# only). Idempotent: installs only what is missing.
#
# QEMU comes from bookworm-backports: the machine's qemu-utils (10.0) is from
# there, and bookworm's own qemu-system 7.2 conflicts with it.
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*"; }

qemu_pkgs=()
command -v qemu-img >/dev/null || qemu_pkgs+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null || qemu_pkgs+=(qemu-system-common)
command -v qemu-system-x86_64 >/dev/null || qemu_pkgs+=(qemu-system-x86)

other_pkgs=()
command -v cpio >/dev/null || other_pkgs+=(cpio)                # guest initramfs
command -v mke2fs >/dev/null || other_pkgs+=(e2fsprogs)         # guest file systems, debugfs
command -v debugfs >/dev/null || other_pkgs+=(e2fsprogs)
command -v gcc >/dev/null || other_pkgs+=(gcc)                  # guest helper (static)
command -v g++ >/dev/null || other_pkgs+=(g++)                  # fuzz/: libfuzzer-sys builds libFuzzer
command -v ip >/dev/null || other_pkgs+=(iproute2)             # two-host fault tests: netns, veth
command -v nft >/dev/null || other_pkgs+=(nftables)             # two-host fault tests: partitions
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || other_pkgs+=(libc6-dev)
command -v python3 >/dev/null || other_pkgs+=(python3 python3-pip)
command -v fio >/dev/null || other_pkgs+=(fio)                  # bench-peers.sh: the device's limit
command -v openssl >/dev/null || other_pkgs+=(openssl)              # integration/tls/make-certs.sh
# --tls-creds-psk runs on GnuTLS, dlopen'ed at start (QEMU depends on it too);
# make-certs.sh writes keys.psk itself, so psktool (gnutls-bin) is not needed.
ldconfig -p 2>/dev/null | grep -q 'libgnutls\.so\.30 ' || other_pkgs+=(libgnutls30)
command -v ocf-tester >/dev/null || other_pkgs+=(resource-agents)   # integration/ocf: ocf-tester
command -v pacemakerd >/dev/null || other_pkgs+=(pacemaker)         # integration/ocf: one-node cluster
command -v corosync >/dev/null || other_pkgs+=(corosync)

if [ ${#qemu_pkgs[@]} -gt 0 ] || [ ${#other_pkgs[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  if [ ${#qemu_pkgs[@]} -gt 0 ]; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    if ! grep -rqs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      log "adding ${codename}-backports to the apt sources"
      cat > /etc/apt/sources.list.d/colo-blk-backports.sources <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: ${codename}-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
  fi
  log "apt-get update"
  apt-get update -q
  if [ ${#qemu_pkgs[@]} -gt 0 ]; then
    log "installing ${qemu_pkgs[*]} from ${codename}-backports"
    apt-get install -y -q -t "${codename}-backports" "${qemu_pkgs[@]}"
  fi
  if [ ${#other_pkgs[@]} -gt 0 ]; then
    log "installing ${other_pkgs[*]}"
    apt-get install -y -q "${other_pkgs[@]}"
  fi
fi

# The control-socket test drives colo-blk with the stock QMP client library.
python3 -c 'import qemu.qmp' 2>/dev/null ||
  pip install --quiet --root-user-action=ignore qemu.qmp

# Fuzz targets (fuzz/): cargo-fuzz from the crates registry; it runs on the stable
# toolchain (test-all.sh sets RUSTC_BOOTSTRAP=1 for its -Z flags).
command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz
