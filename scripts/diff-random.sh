#!/usr/bin/env bash
# The engine's seeded random-program differential run at scale: random
# straight-line integer programs (every GPR, every operand size, memory
# operands, PUSH/POP, flag consumers, forward branches) run on the host CPU,
# on the interpreter and on the translator at threshold 0 (cold, then warm
# with its code and TLB kept), and every register, flag and byte of memory
# compared; then as many random 32-bit programs and as many 16-bit ones
# (legacy_jit.rs: the host runs them in compatibility mode, the 16-bit ones
# in segments of its LDT) on the host CPU, the interpreter and the
# translator. Opt-in (not part of scripts/test.sh or CI); the default suite
# runs 1,500 of the 64-bit programs and 300 of each of the others.
#
#   scripts/diff-random.sh [PROGRAMS] [JOBS] [SEED]
#
# PROGRAMS (default 1000000) of each mode are split over JOBS processes
# (default: the number of CPUs), job k seeded with SEED+k (default: the
# suite's seed), each running its 64-, then 32-, then 16-bit programs. Prints
# the VIREO-DIFF lines of every job, a total per mode and an overall total;
# exits 1 on any mismatch (the failing job prints the case, its seed and
# the states).
set -uo pipefail
cd "$(dirname "$0")/.."
programs=${1:-1000000}
jobs=${2:-$(nproc)}
seed=${3:-$((0x2545f4914f6cdd1d))}
case "$programs$jobs" in
    *[!0-9]*) echo "usage: scripts/diff-random.sh [PROGRAMS] [JOBS] [SEED]" >&2; exit 2 ;;
esac
[ "$jobs" -ge 1 ] || jobs=1

cargo test --release -p emu --test diff_host --test legacy_jit --no-run >/dev/null 2>&1 || {
    echo "diff-random.sh: building the emu differential tests failed:" >&2
    cargo test --release -p emu --test diff_host --test legacy_jit --no-run >&2
    exit 2
}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
start=$(date +%s)
pids=()
for k in $(seq 0 $((jobs - 1))); do
    n=$((programs / jobs + (k < programs % jobs ? 1 : 0)))
    (
        export VIREO_DIFF_CASES=$n VIREO_DIFF_SEED=$((seed + k))
        cargo test --release -p emu --test diff_host random_sequences_at_scale \
            -- --ignored --nocapture >"$logs/$k.64.log" 2>&1 &&
            cargo test --release -p emu --test legacy_jit random_32bit_sequences_at_scale \
                -- --ignored --nocapture >"$logs/$k.32.log" 2>&1 &&
            cargo test --release -p emu --test legacy_jit random_16bit_sequences_at_scale \
                -- --ignored --nocapture >"$logs/$k.16.log" 2>&1
    ) &
    pids+=($!)
done
failed=0
for k in "${!pids[@]}"; do
    if ! wait "${pids[$k]}"; then
        failed=1
        echo "diff-random.sh: job $k failed:" >&2
        cat "$logs/$k".*.log 2>/dev/null | grep -v '^\s*$' | tail -n 40 >&2
    fi
    grep -h '^VIREO-DIFF' "$logs/$k".64.log "$logs/$k".32.log "$logs/$k".16.log 2>/dev/null
done
total_p=0
total_i=0
for mode in 64 32 16; do
    p_mode=0
    i_mode=0
    while read -r p i; do
        p_mode=$((p_mode + p))
        i_mode=$((i_mode + i))
    done < <(cat "$logs"/*."$mode".log 2>/dev/null | grep '^VIREO-DIFF' | sed -E 's/.*: ([0-9]+) programs, ([0-9]+) instructions.*/\1 \2/')
    echo "diff-random.sh: $mode-bit code: $p_mode programs, $i_mode instructions"
    total_p=$((total_p + p_mode))
    total_i=$((total_i + i_mode))
done
echo "diff-random.sh: $total_p programs, $total_i instructions, $jobs jobs, $(( $(date +%s) - start )) s, load $(cut -d' ' -f1-3 /proc/loadavg): $([ $failed = 0 ] && echo '0 mismatches' || echo 'MISMATCH')"
exit $failed
