#!/usr/bin/env bash
# Mutation testing of the code that decides who gets a certificate and what the audit
# log proves (docs/mutants.md): cargo-mutants changes one operator, condition or
# return value at a time and runs the tests that matter for that file; a mutant the
# tests do not notice ("missed") is a check nothing pins down.
#
#   bench/mutants.sh [OPTIONS] FILE...     each FILE on its own, one summary line per file
#   bench/mutants.sh [OPTIONS] --in-diff BASE
#                                          only the mutants on lines `git diff BASE` touches
#                                          in the files below (what CI runs); exits 0 at
#                                          once when the diff touches none of them
# Options:
#   -j N           cargo-mutants jobs (default 1: on 2 cores one build already uses both)
#   --timeout S    the longest one test run of one mutant may take (default 300)
#   --re REGEX     only the mutants whose name (as --list shows it) matches REGEX,
#                  e.g. ' in (check|check_subject)$' for part of a large file
#   --exclude-re REGEX
#                  leave out the mutants whose name matches REGEX (e.g. the part of a
#                  file a previous run covered)
#   --iterate      test again only what the last run of the same FILE did not catch
#                  (after adding tests; the caught ones are counted from that run)
#   --max-mutants N
#                  with --in-diff: when the diff has more than N mutants, test one
#                  round-robin shard of about N of them, the shard chosen by the number
#                  of commits (so successive commits test different shards)
#   --list         list the mutants and the command, run nothing
#
# Only the lib's unit tests and the integration test binaries closest to each file are
# built and run (the table in tests_for below): building the 30-odd test binaries for
# every mutant would take hours. Results: target/mutants/FILE/mutants.out
# (caught.txt, missed.txt, unviable.txt, timeout.txt, a log per mutant); the in-diff
# form writes target/mutants/in-diff/. Exit status: 0 when nothing was missed, 2 when
# a mutant was missed or timed out, 1 when cargo-mutants could not run (its baseline,
# the unmutated tree, failed its tests or did not build).
#
# Requires cargo-mutants (`cargo install cargo-mutants --locked`; figures in
# docs/mutants.md were made with 27.1.0).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

say() { printf 'bench/mutants.sh: %s\n' "$*" >&2; }

# The security-critical files (issue 22); the in-diff form looks at these only.
critical=(src/ca/csr.rs src/ca/profile.rs src/ca/issuer.rs src/identity.rs src/auth src/audit src/admission
    src/agent/schedule.rs)

# tests_for FILE: the integration test binaries (tests/NAME.rs) run besides the lib's
# unit tests, chosen by which tests drive that file's code; fails for files outside
# the list above.
tests_for() {
    case "$1" in
        src/identity.rs) echo "certify properties tokenreview discovery" ;;
        src/ca/csr.rs) echo "hostile windows_csr properties" ;;
        src/ca/profile.rs) echo "certify windows_profile renewal properties" ;;
        src/ca/issuer.rs) echo "certify windows_profile reload token" ;;
        src/auth/source/*.rs) echo "cli certify discovery tokenreview events" ;;
        src/auth/jwt.rs | src/auth/dev.rs | src/auth/mod.rs) echo "hostile certify discovery" ;;
        src/auth/discovery.rs) echo "discovery confirm_pod" ;;
        src/auth/bootstrap.rs) echo "bootstrap token" ;;
        src/auth/replay.rs) echo "bootstrap" ;;
        src/auth/tokenreview.rs) echo "tokenreview events observability" ;;
        src/auth/pods.rs) echo "confirm_pod" ;;
        src/auth/cache.rs) echo "tokenreview confirm_pod" ;;
        src/auth/peer.rs) echo "renewal" ;;
        src/audit/*.rs) echo "transparency faults certify" ;;
        src/admission/*.rs) echo "admission connections" ;;
        src/agent/schedule.rs) echo "agent properties" ;;
        *) return 1 ;;
    esac
}

jobs=1
timeout=300
list=
re=
exclude_re=
iterate=
max=
base=
files=()
while [ $# -gt 0 ]; do
    case "$1" in
        -j) jobs=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --list) list=1; shift ;;
        --re) re=$2; shift 2 ;;
        --exclude-re) exclude_re=$2; shift 2 ;;
        --iterate) iterate=1; shift ;;
        --max-mutants) max=$2; shift 2 ;;
        --in-diff) base=${2:?--in-diff needs a git revision}; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) say "unknown option $1"; exit 1 ;;
        *) files+=("${1#./}"); shift ;;
    esac
done

if [ -n "$base" ]; then
    [ ${#files[@]} -eq 0 ] || { say "--in-diff takes no FILE"; exit 1; }
    git rev-parse --verify --quiet "$base^{commit}" >/dev/null || { say "--in-diff: no commit $base here"; exit 1; }
    mapfile -t files < <(git diff --no-ext-diff --name-only "$base" -- "${critical[@]}" | grep '\.rs$' || true)
    if [ ${#files[@]} -eq 0 ]; then
        echo "mutants: no security-critical file changed since $base"
        exit 0
    fi
elif [ ${#files[@]} -eq 0 ]; then
    say "usage: bench/mutants.sh [-j N] [--timeout S] [--list] FILE... | --in-diff BASE"
    exit 1
fi

command -v cargo-mutants >/dev/null 2>&1 || { say "cargo-mutants is missing: cargo install cargo-mutants --locked"; exit 1; }

# One target directory kept between runs (the registry dependencies build once, not
# once per file), only while one job builds at a time: two jobs sharing it would
# rebuild each other's tree. Incremental builds: each mutant changes one function.
if [ "$jobs" -eq 1 ]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/mutants-build}"
fi
export CARGO_INCREMENTAL=1
# No line tables in the mutants' builds: each mutant relinks every chosen test binary,
# and without debug info that build takes 8 s instead of 10.7 (src/identity.rs's set).
export CARGO_PROFILE_DEV_DEBUG=false

# run NAME FILE...: one cargo-mutants run over FILEs with their tests; prints
# "NAME: mutants M, caught C, missed X, unviable U, timeouts T, minutes N".
run() {
    local name=$1; shift
    local out="target/mutants/$name" tests=() names t f
    for f in "$@"; do
        [ -f "$f" ] || { say "no such file: $f"; return 1; }
        names=$(tests_for "$f") || { say "$f is not in the table of bench/mutants.sh (tests_for)"; return 1; }
        for t in $names; do
            [[ " ${tests[*]} " == *" $t "* ]] || tests+=("$t")
        done
    done
    # --cargo-arg goes to the build and the test run alike, so only these targets are
    # built; arguments after `--` would reach `cargo test` alone.
    local cmd=(cargo mutants --no-shuffle -j "$jobs" --timeout "$timeout" --build-timeout 900
        --output "$out" --cargo-arg=--lib)
    for t in "${tests[@]}"; do cmd+=("--cargo-arg=--test=$t"); done
    for f in "$@"; do cmd+=(--file "$f"); done
    [ -z "$re" ] || cmd+=(--re "$re")
    [ -z "$exclude_re" ] || cmd+=(--exclude-re "$exclude_re")
    [ -z "$iterate" ] || cmd+=(--iterate)
    [ -z "$base" ] || cmd+=(--in-diff "$out/changes.diff")
    mkdir -p "$out"
    if [ -n "$base" ]; then
        git diff --no-ext-diff --no-color --src-prefix=a/ --dst-prefix=b/ "$base" -- "$@" >"$out/changes.diff"
    fi
    if [ -n "$max" ] && [ -n "$base" ]; then
        local n k
        n=$("${cmd[@]}" --list 2>/dev/null | grep -c '^src/' || true)
        if [ "$n" -gt "$max" ]; then
            k=$(((n + max - 1) / max))
            cmd+=(--shard "$(($(git rev-list --count HEAD) % k))/$k" --sharding round-robin)
            say "$name: $n mutants in the diff, over --max-mutants $max: testing shard ${cmd[-3]}"
        fi
    fi
    echo "${cmd[*]}" >"$out/command"
    if [ -n "$list" ]; then
        echo "${cmd[*]}"
        "${cmd[@]}" --list
        return 0
    fi
    say "$name: ${cmd[*]}"
    # --iterate skips what was caught or unviable before and lists both as "previously
    # caught": keep the unviable ones apart so the summary covers the whole file.
    local unviable_before="$out/unviable-before.txt"
    if [ -n "$iterate" ]; then
        cat "$out/mutants.out/unviable.txt" "$unviable_before" 2>/dev/null | sort -u >"$out/unviable.tmp" || true
        mv "$out/unviable.tmp" "$unviable_before"
    else
        # A run that finds nothing to test writes no results: leave none of the last.
        rm -rf "$unviable_before" "$out/mutants.out.old"
        [ ! -d "$out/mutants.out" ] || mv "$out/mutants.out" "$out/mutants.out.old"
    fi
    local started=$SECONDS status=0
    "${cmd[@]}" || status=$?
    local c m u to
    count() { if [ -f "$out/mutants.out/$1" ]; then wc -l <"$out/mutants.out/$1"; else echo 0; fi; }
    c=$(count caught.txt) m=$(count missed.txt) u=$(count unviable.txt) to=$(count timeout.txt)
    if [ -s "$out/mutants.out/previously_caught.txt" ]; then
        local before=0
        [ ! -s "$unviable_before" ] || before=$(wc -l <"$unviable_before")
        c=$((c + $(count previously_caught.txt) - before)) u=$((u + before))
    fi
    printf '%s: mutants %d, caught %d, missed %d, unviable %d, timeouts %d, minutes %s\n' \
        "$name" $((c + m + u + to)) "$c" "$m" "$u" "$to" \
        "$(awk -v s=$((SECONDS - started)) 'BEGIN { printf "%.1f", s / 60 }')"
    [ ! -s "$out/mutants.out/missed.txt" ] || sed 's/^/  missed: /' "$out/mutants.out/missed.txt"
    [ ! -s "$out/mutants.out/timeout.txt" ] || sed 's/^/  timeout: /' "$out/mutants.out/timeout.txt"
    # cargo-mutants: 0 all caught, 2 missed, 3 timeouts, 4 the baseline failed.
    case $status in
        0) return 0 ;;
        2 | 3) return 2 ;;
        *) say "$name: cargo-mutants exited $status (see $out/mutants.out/debug.log)"; return 1 ;;
    esac
}

worst=0
record() { [ "$1" -eq 0 ] || { [ "$worst" -eq 1 ] || worst=$1; }; }
if [ -n "$base" ]; then
    status=0
    run in-diff "${files[@]}" || status=$?
    record $status
else
    for f in "${files[@]}"; do
        status=0
        run "$f" "$f" || status=$?
        record $status
    done
fi
exit $worst
