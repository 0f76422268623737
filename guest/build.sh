#!/usr/bin/env bash
# Build Vireo's test guest images from Debian packages only:
#   guest/build.sh [OUTDIR]
# OUTDIR defaults to $VIREO_GUEST_DIR, else <repo>/guest/out.
# See guest/README.md for what is built and the guest's command line protocol.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
out=${1:-${VIREO_GUEST_DIR:-$repo/guest/out}}

# The meta package whose dependency names the current cloud kernel, and the
# kernel modules that /init loads. Names as modprobe takes them; those built
# into the kernel are recorded as such and not loaded.
KERNEL_META=linux-image-cloud-amd64
WANTED_MODULES=(
    virtio_pci
    virtio_mmio
    virtio_blk
    virtio_net
    virtio_console
    virtio_rng
    virtio_balloon
    vmw_vsock_virtio_transport
    virtiofs
    pvpanic_pci
    rng_core
    ext4
)
# Test data: 1 MiB from xorshift64 (shifts 13, 7, 17) seeded with this value,
# each state after a step written as a little-endian u64. Documented so a
# test can regenerate it without reading the file.
DATA_SEED=0x5649524f47535431 # "VIROGST1"
DATA_SIZE=$((1024 * 1024))

OUTPUTS=(vmlinuz vmlinux System.map kernel.version kernel.config initramfs.cpio.gz
    data.bin data.bin.md5 data.bin.sha256 modules.txt)

# set -e alone would end a failed step silently: name the line.
trap 'echo "guest/build.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

die() {
    echo "guest/build.sh: $*" >&2
    exit 1
}
log() { echo "guest/build.sh: $*"; }

for tool in apt-cache apt-get dpkg dpkg-deb lz4 cpio gzip depmod modprobe file perl python3 flock md5sum sha256sum od gcc; do
    command -v "$tool" >/dev/null 2>&1 || die "missing tool '$tool' (run scripts/install-deps.sh)"
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
cache=$out/cache
mkdir -p "$cache"

# Tests may run several builds at once (e.g. parallel test binaries): one at a
# time per OUTDIR; the later ones then find the stamp up to date.
exec 9>"$out/.lock"
flock 9

# Prints "<package> <version>" of the kernel that KERNEL_META currently depends
# on and of busybox-static, from apt's local lists (no network). One apt-cache
# call: without a package cache file each call re-reads the lists (~1-2 s).
resolve_packages() {
    apt-cache show --no-all-versions "$KERNEL_META" busybox-static 2>/dev/null | awk '
        /^Package: / { pkg = $2 }
        /^Version: / && pkg == "busybox-static" { bver = $2 }
        /^Depends: / && pkg == META {
            # e.g. "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
            if (match($0, /linux-image-[^ ,]*-cloud-amd64 \(= [^)]*\)/)) {
                split(substr($0, RSTART, RLENGTH), f, /[ ()=]+/)
                kpkg = f[1]; kver = f[2]
            }
        }
        END {
            if (kpkg == "" || kver == "" || bver == "") exit 1
            print kpkg, kver
            print "busybox-static", bver
        }' META="$KERNEL_META"
}

script_hash=$(cat "$here/build.sh" "$here/init" "$here/vireo-io.c" "$here/udhcpc.script" "$here/kallsyms.py" | sha256sum | cut -d' ' -f1)

outputs_exist() {
    local f
    for f in "${OUTPUTS[@]}"; do
        [ -s "$out/$f" ] || return 1
    done
}

stamp=$out/stamp
if versions=$(resolve_packages); then
    want_stamp=$(printf 'script %s\n%s\n' "$script_hash" "$versions")
    if outputs_exist && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ]; then
        echo "guest images up to date in $out"
        exit 0
    fi
elif outputs_exist && [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "script $script_hash" ]; then
    # No apt lists on this machine (apt-get update never ran): the images
    # built from this script are still good; say which packages they came from.
    echo "guest images up to date in $out (apt lists unavailable; built from: $(tail -n +2 "$stamp" | tr '\n' ' '))"
    exit 0
fi

# Building: make sure apt's lists exist and name the current packages; an old
# list can name a .deb the mirror no longer has, so refresh once on failure.
apt_update() {
    log "apt-get update"
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq >/dev/null || die "apt-get update failed"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n apt-get update -qq >/dev/null || die "sudo apt-get update failed"
    else
        die "apt lists are missing or stale and I cannot run apt-get update (not root, no sudo)"
    fi
}

apt_opts=(-q)
# As root apt drops to the _apt user to download, which cannot write to a
# root-owned cache dir; it then falls back with a warning. Ask for that directly.
[ "$(id -u)" -eq 0 ] && apt_opts+=(-o APT::Sandbox::User=root)

debdir=$cache/debs
download() {
    local pkg ver
    rm -rf "$debdir.tmp"
    mkdir -p "$debdir.tmp"
    while read -r pkg ver; do
        if [ -f "$debdir/${pkg}.deb" ] && [ "$(dpkg-deb -f "$debdir/${pkg}.deb" Version)" = "$ver" ]; then
            cp "$debdir/${pkg}.deb" "$debdir.tmp/${pkg}.deb"
            continue
        fi
        log "downloading $pkg $ver"
        (cd "$debdir.tmp" && apt-get "${apt_opts[@]}" download "$pkg=$ver" >/dev/null) || return 1
        mv "$debdir.tmp/${pkg}_"*.deb "$debdir.tmp/${pkg}.deb"
    done <<<"$versions"
    rm -rf "$debdir"
    mv "$debdir.tmp" "$debdir"
}

if ! versions=$(resolve_packages) || ! download; then
    apt_update
    versions=$(resolve_packages) || die "cannot resolve $KERNEL_META / busybox-static with apt-cache"
    download || die "apt-get download failed"
fi
kpkg=$(sed -n 1p <<<"$versions" | cut -d' ' -f1)
kver=${kpkg#linux-image-} # the kernel release, e.g. 6.1.0-56-cloud-amd64
want_stamp=$(printf 'script %s\n%s\n' "$script_hash" "$versions")

work=$cache/work
rm -rf "$work"
mkdir -p "$work"
dpkg -x "$debdir/$kpkg.deb" "$work/kernel"
dpkg -x "$debdir/busybox-static.deb" "$work/busybox"
kdir=$work/kernel
modsrc=$kdir/lib/modules/$kver
[ -d "$modsrc" ] || die "$kpkg has no lib/modules/$kver"
[ -f "$kdir/boot/vmlinuz-$kver" ] || die "$kpkg has no boot/vmlinuz-$kver"

# --- vmlinuz, vmlinux -------------------------------------------------------
new=$work/new
mkdir -p "$new"
cp "$kdir/boot/vmlinuz-$kver" "$new/vmlinuz"
cp "$kdir/boot/config-$kver" "$new/kernel.config"
echo "$kver" >"$new/kernel.version"

# The bzImage header (Documentation/x86/boot.rst) locates the compressed
# payload: it starts at (setup_sects + 1) * 512 + payload_offset and is
# payload_length bytes long, the last 4 of which are the uncompressed size.
# Debian's cloud kernel uses LZ4 (legacy frame, magic 02 21 4c 18).
read_le() { od -An -t "u$2" -j "$1" -N "$2" "$new/vmlinuz" | tr -d ' '; }
setup_sects=$(read_le $((0x1f1)) 1)
payload_offset=$(read_le $((0x248)) 4)
payload_length=$(read_le $((0x24c)) 4)
payload_start=$(((setup_sects + 1) * 512 + payload_offset))
magic=$(od -An -tx1 -j "$payload_start" -N 4 "$new/vmlinuz" | tr -d ' ')
[ "$magic" = 02214c18 ] || die "vmlinuz payload at $payload_start is not LZ4 legacy (magic $magic)"
expect_size=$(read_le $((payload_start + payload_length - 4)) 4)
dd if="$new/vmlinuz" of="$work/payload.lz4" bs=64K iflag=skip_bytes,count_bytes \
    skip="$payload_start" count=$((payload_length - 4)) status=none
lz4 -dc "$work/payload.lz4" >"$new/vmlinux" || die "lz4 failed on the kernel payload"
size=$(stat -c %s "$new/vmlinux")
[ "$size" = "$expect_size" ] || die "vmlinux is $size bytes, the bzImage says $expect_size"
[ "$(od -An -tx1 -N 5 "$new/vmlinux" | tr -d ' ')" = 7f454c4602 ] || die "vmlinux is not ELF64"
file -b "$new/vmlinux" | grep -q '^ELF 64-bit LSB executable, x86-64' ||
    die "vmlinux: unexpected type: $(file -b "$new/vmlinux")"

# --- System.map -------------------------------------------------------------
# The kernel's symbols, for debuggers (docs/debugging.md). Debian's package
# ships /boot/System.map as a one-line placeholder pointing at the -dbg
# package (~280 MB); the kernel's own kallsyms table in the vmlinux has every
# symbol /proc/kallsyms lists, so the map is recovered from it. A real map
# in the package is used as it is.
pkg_map=$kdir/boot/System.map-$kver
if [ -f "$pkg_map" ] && [ "$(wc -l <"$pkg_map")" -gt 1000 ]; then
    cp "$pkg_map" "$new/System.map"
else
    python3 "$here/kallsyms.py" "$new/vmlinux" >"$new/System.map" ||
        die "cannot recover System.map from the kernel's kallsyms"
fi
grep -q ' T __x64_sys_newuname$' "$new/System.map" ||
    die "System.map has no __x64_sys_newuname (the uname system call)"

# --- modules ----------------------------------------------------------------
# The .deb ships no modules.dep (its postinst runs depmod): make one for the
# full tree, then let kmod's modprobe list each wanted module's dependencies.
depmod -b "$kdir" "$kver"
declare -A ko_files=()
builtin=()
modular=()
for m in "${WANTED_MODULES[@]}"; do
    deps=$(modprobe -d "$kdir" -S "$kver" --show-depends "$m") || die "module $m not found in $kver"
    if [[ $deps == builtin* ]]; then
        builtin+=("$m")
        continue
    fi
    modular+=("$m")
    while read -r verb path _; do
        case "$verb" in
            insmod) ko_files[${path#"$modsrc/"}]=1 ;;
            builtin) ;;
            *) die "unexpected modprobe output for $m: $verb $path" ;;
        esac
    done <<<"$deps"
done

# --- initramfs tree ---------------------------------------------------------
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/vireo,proc,sys,dev,tmp,run,root,vireo,mnt}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
# One symlink per applet, except where the name is taken already.
for applet in $("$root/bin/busybox" --list-full); do
    [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
[ -L "$root/bin/sh" ] || die "busybox has no sh applet"
install -m 0755 "$here/init" "$root/init"
# udhcpc applies a lease only through its event script (user networking's
# guest gets its address from passt's DHCP).
install -D -m 0755 "$here/udhcpc.script" "$root/etc/udhcpc/default.script"
# The guest side of `vireo bench blk|net` (O_DIRECT AIO, TCP), static so it
# needs nothing from the initramfs.
gcc -static -O2 -s -Wall -o "$root/bin/vireo-io" "$here/vireo-io.c" ||
    die "cannot build vireo-io (needs gcc and libc6-dev)"
printf '%s\n' "${modular[@]}" >"$root/etc/vireo/modules"

mdst=$root/lib/modules/$kver
for rel in "${!ko_files[@]}"; do
    mkdir -p "$mdst/$(dirname "$rel")"
    cp "$modsrc/$rel" "$mdst/$rel"
done
cp "$modsrc"/modules.{builtin,builtin.modinfo,order} "$mdst/"
depmod -b "$root" "$kver"

# Deterministic test data, and its digests in the format md5sum/sha256sum
# print inside the guest, so a test can compare lines as they are.
perl -e '
    use strict; use warnings; no warnings "portable";
    my ($x, $n) = (hex($ARGV[0]), $ARGV[1] / 8);
    my $m = 0xFFFFFFFFFFFFFFFF;
    my $buf = "";
    for (1 .. $n) {
        $x ^= ($x << 13) & $m; $x ^= $x >> 7; $x ^= ($x << 17) & $m;
        $buf .= pack("Q<", $x);
    }
    binmode STDOUT; print $buf;
' "$DATA_SEED" "$DATA_SIZE" >"$root/vireo/data.bin"
[ "$(stat -c %s "$root/vireo/data.bin")" = "$DATA_SIZE" ] || die "data.bin has the wrong size"
echo "hello from the vireo guest" >"$root/vireo/hello.txt"
cp "$root/vireo/data.bin" "$new/data.bin"
echo "$(md5sum <"$root/vireo/data.bin" | cut -d' ' -f1)  /vireo/data.bin" >"$new/data.bin.md5"
echo "$(sha256sum <"$root/vireo/data.bin" | cut -d' ' -f1)  /vireo/data.bin" >"$new/data.bin.sha256"

# --- pack -------------------------------------------------------------------
# Reproducible: fixed mtimes, sorted names, root ownership, normalized inode
# numbers (cpio --reproducible) and no name/time in the gzip header.
find "$root" -exec touch -h -d @0 {} +
# /dev/console must exist before /init runs, or the kernel starts init with no
# stdin/stdout. mknod needs root, so write that one entry as its own small
# newc archive after the main one (which makes /dev); the kernel unpacks
# concatenated archives in turn.
perl -e '
    binmode STDOUT;
    sub pad { my $l = length($_[0]); return $_[0] . ("\0" x ((4 - $l % 4) % 4)); }
    sub entry {
        my ($name, $mode, $rmaj, $rmin, $ino) = @_;
        my $hdr = sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
            $ino, $mode, 0, 0, 1, 0, 0, 0, 0, $rmaj, $rmin, length($name) + 1, 0);
        return pad($hdr . $name . "\0");
    }
    print entry("dev/console", 020600, 5, 1, 900001);
    print entry("TRAILER!!!", 0, 0, 0, 0);
' >"$work/dev.cpio"
(cd "$root" && find . -mindepth 1 | sed 's#^\./##' | sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) >"$work/root.cpio"
cat "$work/root.cpio" "$work/dev.cpio" | gzip -9 -n >"$new/initramfs.cpio.gz"

{
    echo "kernel: $kver ($(sed -n 1p <<<"$versions" | cut -d' ' -f2))"
    echo "busybox-static: $(sed -n 2p <<<"$versions" | cut -d' ' -f2)"
    echo "loaded by /init (modular): ${modular[*]}"
    echo "built in: ${builtin[*]}"
    echo "module files in the initramfs:"
    printf '  %s\n' "${!ko_files[@]}" | sort
    echo "kernel config (y = built in, m = module):"
    grep -E '^CONFIG_(SERIAL_8250|SERIAL_8250_CONSOLE|EXT4_FS|VIRTIO|VIRTIO_PCI|VIRTIO_MMIO|VIRTIO_BLK|VIRTIO_NET|HW_RANDOM|PVH|KVM_GUEST|ACPI)=' \
        "$new/kernel.config" | sed 's/^/  /'
} >"$new/modules.txt"

# --- install ----------------------------------------------------------------
# Replace the outputs, then write the stamp last, so an interrupted build is
# never mistaken for a finished one.
rm -f "$stamp"
for f in "${OUTPUTS[@]}"; do
    mv -f "$new/$f" "$out/$f"
done
echo "$want_stamp" >"$stamp"
rm -rf "$work"
log "built guest images for $kver in $out"
