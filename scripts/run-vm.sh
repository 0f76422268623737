#!/usr/bin/env bash
# Set up and run a VM end to end with the defaults: install what the host
# needs, build the Debian guest images (cached), build Vireo, and boot
# Debian's kernel with the busybox initramfs on this terminal.
# Extra arguments go to `vireo run` (e.g. --cpus 2, --accel kvm).
# Ctrl-A X quits; `poweroff -f` in the guest shell powers off.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
guest="${VIREO_GUEST_DIR:-$repo/guest/out}"
"$repo/scripts/install-deps.sh"
"$repo/guest/build.sh" "$guest"
cargo build --release --manifest-path "$repo/Cargo.toml" -p vireo
exec "$repo/target/release/vireo" run \
  --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio.gz" "$@"
