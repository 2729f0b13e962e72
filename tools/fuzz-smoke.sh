#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a short while; exits non-zero when one crashes.
#
#   tools/fuzz-smoke.sh                  every target, FUZZ_SECONDS (default 20) each
#   tools/fuzz-smoke.sh datetime rsm     only these targets
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 20)
#   FUZZ_SANITIZER  none (default: the fuzzed code is safe Rust) or address
#   FUZZ_WORK       working corpus directory (default fuzz/target/fuzz-work, kept between
#                   runs; the seeds in fuzz/corpus/ are only read, never written)
#
# Works on the stable toolchain: cargo-fuzz needs nightly flags, which RUSTC_BOOTSTRAP=1
# unlocks. Installs cargo-fuzz (cargo install --locked) when it is missing. Crash inputs go
# to fuzz/artifacts/<target>/; reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -a --sanitizer none <target> <file>   (in fuzz/)
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-20}
sanitizer=${FUZZ_SANITIZER:-none}
work=${FUZZ_WORK:-$PWD/target/fuzz-work}
export RUSTC_BOOTSTRAP=1
# cargo-fuzz sets this for `run`; it also matters when a target is run by hand. The bundled
# SQLite (linked in, never called here) trips ASan's ODR check.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# -a: debug assertions and overflow checks, so arithmetic overflow is a crash too.
flags=(-a --sanitizer "$sanitizer")
echo "fuzz-smoke: building ${#targets[@]} targets (sanitizer: $sanitizer)" >&2
cargo fuzz build "${flags[@]}" >&2

failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "corpus/$t"
    log="$work/$t.log"
    echo "fuzz-smoke: $t for ${seconds}s" >&2
    status=0
    cargo fuzz run "${flags[@]}" "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    [ -n "$execs" ] || execs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        summary+=("$(printf '%-12s %12s executions  FAILED (exit %s)' "$t" "${execs:-?}" "$status")")
        echo "---- $t: last lines of $log" >&2
        grep -E -A6 "panicked at|ERROR: libFuzzer|SUMMARY|Test unit written|Base64" "$log" | tail -n 30 >&2 || tail -n 30 "$log" >&2
    else
        summary+=("$(printf '%-12s %12s executions  ok' "$t" "${execs:-?}")")
    fi
done

echo "fuzz-smoke: ${seconds}s per target"
printf '  %s\n' "${summary[@]}"
echo "fuzz: $(( ${#targets[@]} - ${#failed[@]} )) passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz-smoke: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
