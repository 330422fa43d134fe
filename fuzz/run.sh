#!/usr/bin/env bash
# Builds the fuzz targets and runs each for $1 seconds (default 12), starting
# from the committed seeds plus whatever corpus earlier runs left. Exits
# non-zero on the first crash; the input is in fuzz/artifacts/<target>/.
#
#     bash fuzz/run.sh 12          # CI: about a minute for the five targets
#     bash fuzz/run.sh 600 token   # one target, longer
#
# Stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags;
# `-s none` because AddressSanitizer needs a sanitizer-built std; `--dev`
# (unoptimised, debug assertions on) keeps the first build short in CI
# (docs/fuzzing.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
seconds="${1:-12}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(token keys headers page_token requests)
export RUSTC_BOOTSTRAP=1
cargo fuzz build --dev -s none
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    status=0
    cargo fuzz run --dev -s none "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    execs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')"
    cov="$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+' || true)"
    echo "fuzz $t: ${seconds}s, ${execs:-?} executions, ${cov:-cov: ?}, exit $status"
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$log" >&2
        echo "fuzz target $t failed; the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
