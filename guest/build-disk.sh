#!/usr/bin/env bash
# Build Vireo's Debian 12 disk image from Debian packages:
#   guest/build-disk.sh [OUTDIR]
# OUTDIR defaults to $VIREO_GUEST_DIR, else <repo>/guest/out (as guest/build.sh).
# Needs root (loop device, mount, chroot) and the tools of
# scripts/install-deps.sh. See docs/disk-images.md for what is in the image,
# the login, and how the outputs are used.
#
# Outputs in OUTDIR:
#   debian-12.qcow2        the disk: MBR, one bootable ext4 partition, GRUB (i386-pc)
#   debian-12.vmlinuz      the image's own kernel   (a copy of its /boot/vmlinuz-*)
#   debian-12.initrd.img   the image's own initrd   (a copy of its /boot/initrd.img-*)
#   debian-12.txt          the kernel release, the root partition's UUID, the package list
#   debian-12.stamp        what the outputs were built from (written last)
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
out=${1:-${VIREO_GUEST_DIR:-$repo/guest/out}}

SUITE=bookworm
DISK_SIZE=2G # virtual size; the qcow2 holds only what is written (a few hundred MiB)
# Root's password on the serial console (documented in docs/disk-images.md;
# the image is a test fixture, never a server).
ROOT_PASSWORD=vireo
# minbase has neither an init nor a kernel: add them, and what the issue asks
# (cloud-init, GRUB for BIOS) with what those need to work without recommends:
# dbus for hostnamectl (cloud-init sets the hostname through it), ifupdown and
# a DHCP client as cloud-init's network renderer.
PACKAGES=(
    linux-image-cloud-amd64
    systemd-sysv
    udev
    dbus
    cloud-init
    ifupdown
    isc-dhcp-client
    iproute2
    e2fsprogs
)

name=debian-12
OUTPUTS=("$name.qcow2" "$name.vmlinuz" "$name.initrd.img" "$name.txt")

trap 'echo "guest/build-disk.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
die() {
    echo "guest/build-disk.sh: $*" >&2
    exit 1
}
log() { echo "guest/build-disk.sh: $(date +%T) $*"; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, loop devices, mount, chroot)"
for tool in debootstrap sfdisk losetup partx mkfs.ext4 blkid mount chroot qemu-img apt-cache flock sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "missing tool '$tool' (run scripts/install-deps.sh)"
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
cache=$out/cache
mkdir -p "$cache/debootstrap"

exec 9>"$out/.disk.lock"
flock 9

# The mirror apt uses here (deb822 or one-line sources), so the image comes
# from the same archive as the host's packages.
mirror=$(grep -rhoE '(URIs:[[:space:]]*|^deb[[:space:]]+)https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | grep -oE 'https?://[^[:space:]]+' | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
security=$(grep -rhoE '(URIs:[[:space:]]*|^deb[[:space:]]+)https?://[^[:space:]]+/debian-security/?([[:space:]]|$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | grep -oE 'https?://[^[:space:]]+' | head -n1 || true)

# Up to date when this script and the kernel the meta package names are
# unchanged (the archive is a fixed snapshot; a new kernel means a rebuild).
kernel_dep=$(apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^Depends: .*\(linux-image-[^ ,]*-cloud-amd64 (= [^)]*)\).*/\1/p' | head -n1 || true)
script_hash=$(sha256sum <"$here/build-disk.sh" | cut -d' ' -f1)
want_stamp=$(printf 'script %s\nmirror %s %s\nkernel %s\n' "$script_hash" "$mirror" "$security" "$kernel_dep")
stamp=$out/$name.stamp
outputs_exist() {
    local f
    for f in "${OUTPUTS[@]}"; do [ -s "$out/$f" ] || return 1; done
}
if outputs_exist && [ -f "$stamp" ]; then
    if [ "$(cat "$stamp")" = "$want_stamp" ]; then
        echo "disk image up to date in $out"
        exit 0
    fi
    if [ -z "$kernel_dep" ] && [ "$(head -n1 "$stamp")" = "script $script_hash" ]; then
        echo "disk image up to date in $out (apt lists unavailable)"
        exit 0
    fi
fi
start=$(date +%s)

work=$cache/disk-work
mnt=$work/mnt
loopdev=
cleanup() {
    local m
    # Unmount whatever is still mounted under the work tree, innermost first.
    if [ -d "$mnt" ]; then
        for m in $(awk -v p="$mnt" '$2 == p || index($2, p "/") == 1 { print $2 }' /proc/mounts | sort -r); do
            umount -l "$m" 2>/dev/null || true
        done
    fi
    [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
rm -rf "$work"
mkdir -p "$mnt"

# --- raw disk: MBR, one bootable Linux partition from 1 MiB --------------------
raw=$work/$name.raw
truncate -s "$DISK_SIZE" "$raw"
echo 'label: dos
start=2048, type=83, bootable' | sfdisk -q "$raw"
loopdev=$(losetup -f --show -P "$raw")
part=${loopdev}p1
# Without udev (containers, CI) the partition node may not appear by itself.
[ -b "$part" ] || partx -a "$loopdev" 2>/dev/null || true
for _ in 1 2 3 4 5 6 7 8 9 10; do
    [ -b "$part" ] && break
    sleep 0.5
done
[ -b "$part" ] || die "no partition device $part for $loopdev"
mkfs.ext4 -q -L debian-root "$part"
uuid=$(blkid -s UUID -o value "$part")
mount "$part" "$mnt"

# --- install -----------------------------------------------------------------
# debootstrap lays down minbase only (its resolver does not follow virtual
# packages, which cloud-init's dependencies use); apt in the new root then
# installs the rest, its downloads kept in the cache for the next build.
log "debootstrap $SUITE (minbase) from $mirror"
if ! debootstrap --variant=minbase --cache-dir="$cache/debootstrap" \
    "$SUITE" "$mnt" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    [ -f "$mnt/debootstrap/debootstrap.log" ] && tail -n 30 "$mnt/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (log above)"
fi

for d in dev dev/pts proc sys; do mount --bind "/$d" "$mnt/$d"; done
mkdir -p "$cache/apt-archives/partial"
mount --bind "$cache/apt-archives" "$mnt/var/cache/apt/archives"
in_root() { chroot "$mnt" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }

# The suites the host's apt uses: the release, its updates and, when the
# host has it, the security archive (the current kernel may come from there).
{
    echo "deb $mirror $SUITE main"
    echo "deb $mirror $SUITE-updates main"
    if [ -n "$security" ]; then echo "deb $security $SUITE-security main"; fi
} >"$mnt/etc/apt/sources.list"
# GRUB's postinst installs nothing by itself: grub-install runs below, on
# the loop device.
in_root debconf-set-selections <<'EOF'
grub-pc grub-pc/install_devices multiselect
grub-pc grub-pc/install_devices_empty boolean true
EOF
log "apt-get install ${PACKAGES[*]} grub-pc"
{ in_root apt-get -q update && in_root apt-get -q -y --no-install-recommends install "${PACKAGES[@]}" grub-pc; } \
    >"$work/apt.log" 2>&1 || {
    tail -n 40 "$work/apt.log" >&2
    die "apt-get install in the image failed (log above)"
}

cat >"$mnt/etc/fstab" <<EOF
UUID=$uuid / ext4 errors=remount-ro 0 1
EOF
echo debian >"$mnt/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$mnt/etc/hosts"
echo "root:$ROOT_PASSWORD" | in_root chpasswd
# A login prompt on the serial port whatever the kernel's console= says
# (the generator adds one only for the console= device).
in_root systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1
# serial-getty@ttyS0 is bound to dev-ttyS0.device, which exists once udevd
# has processed the coldplug events. systemd gives a device job 90 s
# (DefaultTimeoutStartSec) from the moment it queues it, early in boot; in a
# software-emulated guest on a loaded host udevd itself starts later than
# that, the job times out and the getty is never started ("Dependency
# failed for Serial Getty on ttyS0"), so the boot ends with no login
# prompt. The port is always there: wait for udev however long it takes.
mkdir -p "$mnt/etc/systemd/system/dev-ttyS0.device.d"
cat >"$mnt/etc/systemd/system/dev-ttyS0.device.d/90-vireo-slow-boot.conf" <<'EOF'
# Vireo's Debian test image: a slow (emulated) boot must still get its
# serial getty (guest/build-disk.sh says why).
[Unit]
JobRunningTimeoutSec=infinity
EOF
# cloud-init: NoCloud only (the seed disk labelled cidata), then None, so boot
# never waits on a cloud metadata server that is not there.
cat >"$mnt/etc/cloud/cloud.cfg.d/90_vireo.cfg" <<'EOF'
# Vireo's Debian test image: only the NoCloud seed (a disk labelled cidata).
datasource_list: [ NoCloud, None ]
# minbase has no locales package: cloud-init's default en_US.UTF-8 cannot be
# generated (its locale module then fails cloud-config.service); C.UTF-8 is
# built into libc.
locale: C.UTF-8
# No SSH server in the image: no host keys to generate.
ssh_genkeytypes: []
EOF

# GRUB for BIOS, on the serial terminal.
cat >"$mnt/etc/default/grub" <<'EOF'
# Vireo's Debian test image: GRUB and the kernel on the serial port.
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=ttyS0,115200n8"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
EOF
in_root grub-install --target=i386-pc --modules="part_msdos ext2" "$loopdev" >"$work/grub-install.log" 2>&1 ||
    { cat "$work/grub-install.log" >&2; die "grub-install failed"; }
in_root update-grub >"$work/update-grub.log" 2>&1 ||
    { cat "$work/update-grub.log" >&2; die "update-grub failed"; }
# grub-mkconfig writes root=UUID= only when /dev/disk/by-uuid has the
# filesystem, which needs udev; here it names the loop partition instead.
# In the guest (with udev) a later update-grub writes root=UUID= itself.
sed -i "s#root=$part #root=UUID=$uuid #" "$mnt/boot/grub/grub.cfg"
grep -q "root=UUID=$uuid" "$mnt/boot/grub/grub.cfg" || die "grub.cfg does not boot root=UUID=$uuid"
! grep -q "$loopdev" "$mnt/boot/grub/grub.cfg" || die "grub.cfg still names $loopdev"

kver=$(basename "$(ls -d "$mnt"/lib/modules/*-cloud-amd64 | head -n1)")
# The stamp says which kernel the host's apt names; say so if the image got another.
case "$kernel_dep" in
    "" | "linux-image-$kver "*) ;;
    *) log "warning: the image has $kver, the host's apt names $kernel_dep (different apt lists?)" ;;
esac
[ -f "$mnt/boot/vmlinuz-$kver" ] || die "no /boot/vmlinuz-$kver in the image"
[ -f "$mnt/boot/initrd.img-$kver" ] || die "no /boot/initrd.img-$kver in the image"

# Small: no package cache, no apt lists (apt-get update in the guest refetches them).
umount "$mnt/var/cache/apt/archives"
rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/debconf/*-old "$mnt"/var/log/*.log
rm -f "$mnt/etc/machine-id" && touch "$mnt/etc/machine-id" # a new one on first boot

new=$work/new
mkdir -p "$new"
cp "$mnt/boot/vmlinuz-$kver" "$new/$name.vmlinuz"
cp "$mnt/boot/initrd.img-$kver" "$new/$name.initrd.img"
{
    echo "kernel: $kver"
    echo "root: UUID=$uuid (partition 1, ext4, label debian-root)"
    echo "login: root / $ROOT_PASSWORD"
    echo "mirror: $mirror $SUITE"
    echo "packages:"
    in_root dpkg-query -W -f='  ${Package} ${Version}\n'
} >"$new/$name.txt"
used=$(df -m --output=used "$mnt" | tail -n1 | tr -d ' ')
# Give the blocks of deleted files (apt lists, caches) back to the sparse raw
# file, so that the qcow2 holds only live data.
fstrim "$mnt" || log "fstrim failed: the qcow2 keeps the deleted files' blocks"

cleanup
loopdev=
# Zero blocks are not written: the qcow2 holds only the allocated data.
qemu-img convert -q -O qcow2 "$raw" "$new/$name.qcow2"
qemu-img check -q "$new/$name.qcow2" || die "qemu-img check failed on the new image"

rm -f "$stamp"
for f in "${OUTPUTS[@]}"; do mv -f "$new/$f" "$out/$f"; done
echo "$want_stamp" >"$stamp"
rm -rf "$work"
log "built $out/$name.qcow2 ($kver, ${used} MiB used of $DISK_SIZE, qcow2 $(du -m "$out/$name.qcow2" | cut -f1) MiB) in $(($(date +%s) - start)) s"
