#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60), one after another, and prints
# per target the executions, the coverage (libFuzzer's cov:/ft: for the seeds alone,
# then at the end) and the corpus size. Exits non-zero if a target crashes or breaks
# an invariant, naming the artifact that reproduces it (fuzz/artifacts/TARGET/…).
# Without the nightly toolchain or cargo-fuzz it says so and exits 0 ("skipped").
#
#   fuzz/run.sh [SECONDS]
#
# Environment: FUZZ_TARGETS="csr jwt" (a subset), FUZZ_SANITIZER=address (default
# none: meshca forbids unsafe code, and without ASan the targets build faster and
# run two to three times as many inputs), FUZZ_CORPUS_DIR=DIR (keep the inputs found, per
# target, across runs; default: a scratch directory removed at the end, so every run
# starts from the committed seeds and figures are comparable).
set -uo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
    echo "usage: fuzz/run.sh [SECONDS]   (whole seconds per target, default 60)" >&2
    exit 2
fi
targets=(${FUZZ_TARGETS:-csr certify jwt pem audit_verify checkpoint})
sanitizer=${FUZZ_SANITIZER:-none}

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: skipped: no nightly toolchain (cargo +nightly fails); install one with 'rustup toolchain install nightly'"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: skipped: cargo-fuzz is not installed; install it with 'cargo install cargo-fuzz --locked'"
    exit 0
fi

# Scratch space for the working corpus and for files the targets write (tmpfs if any).
base=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && base=/dev/shm
scratch=$(mktemp -d "$base/meshca-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

start=$(date +%s)
echo "fuzz: building ${targets[*]} ($(cargo +nightly fuzz --version), sanitizer $sanitizer)"
# fuzz/target always (not a CARGO_TARGET_DIR shared with the main crate's builds, whose
# flags differ).
target_dir="$PWD/target"
if ! cargo +nightly fuzz build -s "$sanitizer" --target-dir "$target_dir" >"$scratch/build.log" 2>&1; then
    tail -n 40 "$scratch/build.log"
    echo "fuzz: FAILED: the targets do not build"
    exit 1
fi
built=$(date +%s)
# The binaries just built are run directly: `cargo fuzz run` would rebuild first, and
# in a tree being edited every target could then test different code.
host=$(rustc +nightly -vV | sed -n 's/^host: //p')
bin="$target_dir/$host/release"
echo "fuzz: built in $((built - start)) s; running each target for $seconds s"

failed=0
passed=0
summary=()
for t in "${targets[@]}"; do
    work=${FUZZ_CORPUS_DIR:+$FUZZ_CORPUS_DIR/$t}
    work=${work:-$scratch/corpus/$t}
    mkdir -p "$work" "artifacts/$t"
    log="$scratch/$t.log"
    TMPDIR="$scratch" "$bin/$t" "$work" "corpus/$t" \
        -max_total_time="$seconds" -timeout=20 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        </dev/null >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    last=$(grep -E '^#[0-9]+.*cov: [0-9]+' "$log" | tail -n 1)
    # Coverage of the seeds alone, for comparison.
    seeded=$(grep -E '^#[0-9]+.*INITED.*cov: [0-9]+' "$log" | head -n 1)
    cov0=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$seeded")
    ft0=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$seeded")
    cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<<"$last")
    if [ -z "$execs" ]; then execs=$(sed -n 's/^#\([0-9]*\).*/\1/p' <<<"$last"); fi
    if [ "$rc" -eq 0 ]; then
        result=ok
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        result="FAILED (exit $rc${artifact:+, artifact fuzz/$artifact})"
        echo "---- $t: last lines of the libFuzzer log"
        grep -v '^\s*[0-9]*: \|^\s*at ' "$log" | tail -n 30
        if [ -n "$artifact" ]; then
            echo "---- reproduce: (cd fuzz && cargo +nightly fuzz run -s $sanitizer $t $artifact)"
        fi
    fi
    line=$(printf '%-13s execs %-9s %-9s cov %-11s ft %-11s corpus %-10s %s' \
        "$t" "${execs:-?}" "(${rate:-?}/s)" "${cov0:-?}->${cov:-?}" "${ft0:-?}->${ft:-?}" "${corp:-?}" "$result")
    echo "fuzz: $line"
    summary+=("$line")
done

echo "fuzz: summary ($seconds s per target, $(nproc) cores, $(date -u +%Y-%m-%d), total $(($(date +%s) - start)) s)"
printf '  %s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "fuzz: a target crashed or broke an invariant (artifacts under fuzz/artifacts/)"
fi
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
