#!/usr/bin/env bash
# Run every cargo-fuzz target in the repository (crates/*/fuzz) for a bounded
# time each and print, per target, the executions libFuzzer made and the
# crashes it found. Opt-in (not part of scripts/test.sh or CI): it needs the
# nightly toolchain and cargo-fuzz, which it installs with cargo if missing.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
#
# Corpora grow in crates/*/fuzz/corpus/<target>, crashes are kept in
# crates/*/fuzz/artifacts/<target> (both ignored by git). Seed inputs kept
# in git (crates/*/fuzz/seeds/<target>: small valid images) are read too. Exits 1 if any
# target crashed, 2 if the tools are missing and cannot be installed.
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz.sh: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked || { echo "fuzz.sh: cannot install cargo-fuzz" >&2; exit 2; }
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
summary=()
crashed=0
for dir in crates/*/fuzz; do
    crate=$(basename "$(dirname "$dir")")
    for target in $(cd "$dir" && cargo +nightly fuzz list); do
        log="$logs/$crate-$target.log"
        echo "fuzz.sh: $crate/$target for ${secs}s"
        before=$(ls "$dir/artifacts/$target" 2>/dev/null | wc -l)
        corpora=()
        if [ -d "$dir/seeds/$target" ]; then
            mkdir -p "$dir/corpus/$target"
            corpora=("corpus/$target" "seeds/$target")
        fi
        (cd "$dir" && cargo +nightly fuzz run "$target" "${corpora[@]}" -- \
            -max_total_time="$secs" -max_len=262144 -rss_limit_mb=2048 -print_final_stats=1) >"$log" 2>&1
        rc=$?
        execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{print $2}' | tail -1)
        after=$(ls "$dir/artifacts/$target" 2>/dev/null | wc -l)
        crashes=$((after - before))
        note=""
        if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
            # A failure that left no artifact: a build error (no executions)
            # or a timeout. Counted as a failure, named as what it was.
            crashes=1
            if [ -z "$execs" ]; then note=" (did not build or start: see above)"; else note=" (no artifact: see above)"; fi
            tail -20 "$log" >&2
        fi
        [ "$crashes" -gt 0 ] && crashed=1
        summary+=("$(printf '%-10s %-20s %14s executions %3d crashes%s' "$crate" "$target" "${execs:-?}" "$crashes" "$note")")
    done
done
echo
echo "fuzz.sh: ${secs}s per target"
printf '%s\n' "${summary[@]}"
exit "$crashed"
