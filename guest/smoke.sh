#!/usr/bin/env bash
# Boot the guest images under QEMU TCG and check the guest protocol end to end:
#   guest/smoke.sh [OUTDIR]    (OUTDIR as for guest/build.sh)
# This checks the images (and gives the software-virtualization reference
# time); it does not involve Vireo. Needs qemu-system-x86 and e2fsprogs
# (scripts/install-deps.sh). Ends with "N passed, N failed".
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-${VIREO_GUEST_DIR:-$(dirname "$here")/guest/out}}
for f in vmlinuz vmlinux initramfs.cpio.gz data.bin data.bin.md5; do
    [ -s "$out/$f" ] || {
        echo "guest/smoke.sh: $out/$f missing (run guest/build.sh)" >&2
        exit 1
    }
done
command -v qemu-system-x86_64 >/dev/null || {
    echo "guest/smoke.sh: qemu-system-x86_64 missing (run scripts/install-deps.sh)" >&2
    exit 1
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
md5_line=$(cat "$out/data.bin.md5") # "<md5>  /vireo/data.bin"
md5=${md5_line%% *}
passed=0
failed=0

# boot NAME KERNEL APPEND [extra qemu args...]: boots with a 120 s limit,
# leaving the console output in $tmp/NAME.log and the wall time in $secs.
boot() {
    local name=$1 kernel=$2 append=$3 start end
    shift 3
    start=$(date +%s%N)
    # QEMU exits by itself when the guest powers off (or resets: -no-reboot).
    if ! timeout 120 qemu-system-x86_64 -accel tcg -M pc -m 256 -nographic -no-reboot \
        -kernel "$out/$kernel" -initrd "$out/initramfs.cpio.gz" -append "$append" "$@" \
        </dev/null >"$tmp/$name.log" 2>&1; then
        echo "  qemu exited with an error or timed out"
    fi
    end=$(date +%s%N)
    secs=$(awk -v d=$((end - start)) 'BEGIN { printf "%.2f", d / 1e9 }')
}

# expect NAME PATTERN...: every fixed string must be a line of the log.
expect() {
    local name=$1 p ok=1
    shift
    for p in "$@"; do
        if ! tr -d '\r' <"$tmp/$name.log" | grep -qxF -- "$p"; then
            echo "  missing line: $p"
            ok=0
        fi
    done
    if [ "$ok" = 1 ]; then
        passed=$((passed + 1))
        echo "ok   $name (${secs}s)"
    else
        failed=$((failed + 1))
        echo "FAIL $name (${secs}s); console output:"
        sed 's/^/  | /' "$tmp/$name.log" | tail -n 40
    fi
}

echo "smoke: bzImage, unquoted vireo.cmd, poweroff"
boot bzimage vmlinuz "console=ttyS0 panic=-1 vireo.cmd=md5sum /vireo/data.bin; nproc"
expect bzimage "VIREO-INIT: up" "VIREO-CMD-BEGIN" "$md5_line" "1" "VIREO-CMD-END rc=0" \
    "VIREO-INIT: poweroff"
grep -q 'reboot: Power down' "$tmp/bzimage.log" || echo "  note: no 'reboot: Power down' from the kernel"

echo "smoke: vmlinux through PVH, quiet, quoted vireo.cmd"
boot pvh vmlinux "console=ttyS0 quiet panic=-1 vireo.cmd=\"sha256sum /vireo/data.bin; cat /vireo/hello.txt\""
expect pvh "VIREO-INIT: up" "$(cat "$out/data.bin.sha256")" "hello from the vireo guest" \
    "VIREO-CMD-END rc=0"

echo "smoke: virtio devices, ext4 disk, exit code, vireo.reboot"
mkdir -p "$tmp/disk"
cp "$out/data.bin" "$tmp/disk/data.bin"
mkfs.ext4 -q -d "$tmp/disk" "$tmp/disk.img" 16M >/dev/null
boot devices vmlinuz \
    "console=ttyS0 quiet panic=-1 vireo.reboot vireo.cmd=\"mount -t ext4 /dev/vda /mnt && md5sum /mnt/data.bin | cut -d' ' -f1 && ls -d /sys/bus/virtio/drivers/virtio_net/virtio* /sys/bus/virtio/drivers/virtio_rng/virtio* | wc -l; exit 7\"" \
    -drive "file=$tmp/disk.img,if=none,id=d0,format=raw" -device virtio-blk-pci,drive=d0 \
    -netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0 -device virtio-rng-pci
expect devices "VIREO-INIT: up" "$md5" "2" "VIREO-CMD-END rc=7" "VIREO-INIT: reboot"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
