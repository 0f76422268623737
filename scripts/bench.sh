#!/usr/bin/env bash
# Build Vireo and its benchmark tool (release, one target directory) and run
# the benchmark, so the figures are always of the vireo built from this tree.
# Arguments go to `vireo-bench` (see README, "Benchmarks"), e.g.
#
#   scripts/bench.sh startup
#   scripts/bench.sh boot --runs 5 [--accel kvm]
#
# Guest images for boot, blk and net: $VIREO_GUEST_DIR or guest/out
# (guest/build.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
target="${CARGO_TARGET_DIR:-$repo/target}"
cargo build --release --manifest-path "$repo/Cargo.toml" -p vireo -p vireo-bench
exec "$target/release/vireo-bench" "$@"
