#!/usr/bin/env bash
# Run Vireo's whole test suite: builds the guest images if needed (cached),
# then every unit and guest-boot test.
#
#   scripts/test.sh           the default suite (what CI runs)
#   scripts/test.sh --slow    also the long boots under nested KVM (opt-in)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export VIREO_GUEST_DIR="${VIREO_GUEST_DIR:-$repo/guest/out}"
slow=0
for a in "$@"; do
  case "$a" in
    --slow) slow=1 ;;
    *) echo "usage: scripts/test.sh [--slow]" >&2; exit 2 ;;
  esac
done
"$repo/guest/build.sh" "$VIREO_GUEST_DIR"
# The Debian disk image (vireo/tests/disk_image.rs boots it through SeaBIOS
# and GRUB) needs root to build (loop device, mount, chroot); without root
# and without an image that test says SKIPPED.
if [ "$(id -u)" -eq 0 ]; then
  "$repo/guest/build-disk.sh" "$VIREO_GUEST_DIR"
elif [ ! -f "$VIREO_GUEST_DIR/debian-12.qcow2" ]; then
  echo "note: not root: the Debian disk image (guest/build-disk.sh) is not built; its boot test skips" >&2
fi
cd "$repo"
if [ "$slow" = 1 ]; then
  cargo test --workspace --release -- --include-ignored --test-threads=2
  # The Debian guest tests (virtio-blk, -net, -rng) again under KVM, where
  # KVM can boot Debian: not on the nested PVM KVM of this project's build
  # machines, which stops before userspace (see README, "This machine's KVM").
  if [ -e /sys/module/kvm_pvm ]; then
    echo "note: nested PVM KVM here; the Debian guest tests under --accel kvm are skipped" >&2
  else
    VIREO_TEST_ACCEL=kvm cargo test --release -p vireo --test linux_emu -- --test-threads=1
  fi
else
  cargo test --workspace --release
fi
