#!/usr/bin/env bash
# Builds the guest that the guest tests boot: a Debian kernel (vmlinuz plus the
# virtio and ext4 modules it needs) and a busybox initramfs carrying the test cases.
#
# Everything comes from Debian packages fetched with `apt-get download` and unpacked
# with `dpkg-deb -x`; nothing is installed into the host's /boot or /lib/modules.
#
# Output (GUEST_BUILD_DIR, default build/guest at the repository root):
#   vmlinuz             the kernel
#   initramfs.cpio.gz   busybox, modules, /init, the guest test cases
#   kernel/             cached kernel extract (kept across rebuilds of the initramfs)
# The kernel is fetched only when kernel/ is missing; the initramfs is rebuilt when
# it is missing or when one of its inputs in this directory changed.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${GUEST_BUILD_DIR:-$repo/build/guest}"
# Top-level modules the guest needs; their dependencies are resolved from the
# kernel's own module metadata. crc32c backs ext4's metadata checksums, which the
# kernel would otherwise request through a modprobe helper the guest lacks.
wanted_modules=(virtio_pci virtio_blk ext4 crc32c_generic)

log() { printf 'guest-build: %s\n' "$*" >&2; }

mkdir -p "$out"
tmp="$(mktemp -d "$out/tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# apt_download PACKAGE DIR: fetch PACKAGE's .deb into DIR, print its path. apt
# warns that root downloads outside _apt's reach; that is expected here.
apt_download() {
  local try
  for try in 1 2; do
    (cd "$2" && apt-get download -q "$1" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) || true
    if ls "$2/$1"_*.deb >/dev/null 2>&1; then
      ls "$2/$1"_*.deb | head -n1
      return 0
    fi
    [ "$try" = 1 ] && apt-get update -q >&2  # stale or missing package lists
  done
  log "apt-get download $1 failed"
  return 1
}

# --- kernel -----------------------------------------------------------------
# The versioned image package the distribution's linux-image-amd64 points at.
kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

fetch_kernel() {
  local work pkg rel
  work="$tmp/kernel"
  mkdir -p "$work"
  pkg="$(kernel_package)"
  if [ -z "$pkg" ]; then
    # A fresh machine may have no package lists yet.
    apt-get update -q >&2
    pkg="$(kernel_package)"
  fi
  [ -n "$pkg" ] || { log "cannot resolve linux-image-amd64"; return 1; }
  log "fetching $pkg"
  local deb
  deb="$(apt_download "$pkg" "$work")"
  dpkg-deb -x "$deb" "$work/root"
  rel="$(ls "$work/root/lib/modules" | head -n1)"
  [ -n "$rel" ] || { log "$pkg has no modules"; return 1; }
  # The package ships no modules.dep (depmod runs at install time); generate it
  # inside the extract, never in the host's /lib/modules.
  "$busybox" depmod -b "$work/root" "$rel"

  local stage="$work/stage"
  mkdir -p "$stage/modules"
  cp "$work/root/boot/vmlinuz-$rel" "$stage/vmlinuz"
  python3 - "$work/root/lib/modules/$rel" "$stage/modules" "${wanted_modules[@]}" <<'PY'
import os, shutil, sys

moddir, dest, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
deps = {}
with open(os.path.join(moddir, "modules.dep")) as f:
    for line in f:
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
by_name = {os.path.basename(p).split(".ko")[0].replace("-", "_"): p for p in deps}
builtin = set()
with open(os.path.join(moddir, "modules.builtin")) as f:
    for line in f:
        builtin.add(os.path.basename(line.strip()).split(".ko")[0].replace("-", "_"))

order, seen = [], set()

def visit(path):
    if path in seen:
        return
    seen.add(path)
    for dep in deps.get(path, []):
        visit(dep)
    order.append(path)

for name in wanted:
    if name in by_name:
        visit(by_name[name])
    elif name in builtin:
        print(f"guest-build: {name} is built into the kernel", file=sys.stderr)
    else:
        sys.exit(f"guest-build: module {name} neither built in nor shipped")

for path in order:
    target = os.path.join(dest, path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(os.path.join(moddir, path), target)
with open(os.path.join(dest, "order"), "w") as f:
    f.write("\n".join(order) + "\n")
print("guest-build: module load order: " + " ".join(
    os.path.basename(p) for p in order), file=sys.stderr)
PY
  echo "$rel" >"$stage/release"
  echo "$pkg" >"$stage/package"
  rm -rf "$out/kernel"
  mv "$stage" "$out/kernel"
}

# --- busybox ----------------------------------------------------------------
fetch_busybox() {
  local work deb
  work="$tmp/busybox"
  mkdir -p "$work"
  log "fetching busybox-static"
  deb="$(apt_download busybox-static "$work")"
  dpkg-deb -x "$deb" "$work/root"
  cp "$work/root/bin/busybox" "$out/busybox.new"
  mv "$out/busybox.new" "$out/busybox"
}

# (Not `test || fetch`: errexit does not apply inside a function called that way.)
if [ ! -x "$out/busybox" ]; then fetch_busybox; fi
busybox="$out/busybox"
if [ ! -f "$out/kernel/vmlinuz" ] || [ ! -f "$out/kernel/modules/order" ]; then fetch_kernel; fi

# --- initramfs --------------------------------------------------------------
inputs=("$here/init" "$here/blkzero.c" "$here/blkstress.c" "$here/build.sh" "$out/kernel/package" "$busybox")
while IFS= read -r f; do inputs+=("$f"); done < <(find "$here/cases" -type f | sort)
stamp="$(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1)"
if [ -f "$out/initramfs.cpio.gz" ] && [ -f "$out/vmlinuz" ] &&
  [ "$(cat "$out/initramfs.stamp" 2>/dev/null)" = "$stamp" ]; then
  log "up to date ($out)"
  exit 0
fi

log "assembling initramfs"
root="$tmp/initramfs"
rel="$(cat "$out/kernel/release")"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,mnt,tmp,guest,lib/modules/"$rel"}
cp "$busybox" "$root/bin/busybox"
cp -r "$out/kernel/modules/." "$root/lib/modules/$rel/"
cc -static -Os -Wall -Werror -o "$root/bin/blkzero" "$here/blkzero.c"
cc -static -Os -Wall -Werror -o "$root/bin/blkstress" "$here/blkstress.c"
cp "$here/init" "$root/init"
cp -r "$here/cases" "$root/guest/"
chmod 0755 "$root/init" "$root/bin/busybox" "$root/bin/blkzero" "$root/bin/blkstress"
# /dev/console must exist before devtmpfs is mounted, or init starts without
# stdin/stdout and the serial console stays silent.
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
  cpio --null --create --format=newc --owner=0:0 --quiet) >"$out/initramfs.cpio"
# Creating a device node in the staging tree needs root and leaves it on the host;
# the kernel merges concatenated archives, so append one holding just the node.
python3 - "$out/initramfs.cpio" <<'PY'
import sys

def entry(name, mode, rdev_major=0, rdev_minor=0, ino=900000):
    name_b = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, 0, 0, 0, rdev_major, rdev_minor, len(name_b), 0]
    hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
    data = hdr + name_b
    data += b"\0" * (-len(data) % 4)
    return data

with open(sys.argv[1], "ab") as f:
    blob = entry("dev/console", 0o020600, 5, 1) + entry("TRAILER!!!", 0, ino=0)
    f.write(blob + b"\0" * (-len(blob) % 512))
PY
gzip -9 -n -f "$out/initramfs.cpio"
cp "$out/kernel/vmlinuz" "$out/vmlinuz"
echo "$stamp" >"$out/initramfs.stamp"
log "built $out/initramfs.cpio.gz ($(du -h "$out/initramfs.cpio.gz" | cut -f1)), kernel $(cat "$out/kernel/package")"
