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
cd "$repo"
if [ "$slow" = 1 ]; then
  cargo test --workspace --release -- --include-ignored --test-threads=2
else
  cargo test --workspace --release
fi
