#!/usr/bin/env bash
# Build every tests/fuzz/fuzz_*.c as a libFuzzer target (clang,
# -fsanitize=fuzzer,address,undefined) and run each for FUZZ_SECONDS against
# a temporary copy of its seed corpus, so the checked-in corpus never grows
# by accident. Any crash, leak, timeout or sanitizer report fails the run.
#
#   tests/fuzz/run.sh [fuzz_NAME ...]     default: every tests/fuzz/fuzz_*.c
#
# Environment:
#   FUZZ_SECONDS   seconds per target (default 60)
#   FUZZ_OUT       work directory for binaries, corpora, logs and crash
#                  artifacts (default: a new temp directory, kept on failure)
#   FUZZ_RESULTS   if set, "PASS fuzz_x" / "FAIL fuzz_x: why" lines are
#                  appended to this file (tests/run-all.sh counts them)
#   CC             the compiler (default clang; libFuzzer needs clang)
#
# Seed corpus: tests/fuzz/corpus/<target>/ (e.g. corpus/fuzz_http1/), or
# corpus/<name without fuzz_>/. Optional dictionary: tests/fuzz/<target>.dict
# or tests/fuzz/<name>.dict. A reproduced crash: <binary> <artifact>.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

# The sources each target links, besides the target itself. A new target
# must be added here; one missing from this table fails loudly.
declare -A SOURCES=(
    [fuzz_http1]="src/http1.c src/log.c"
    [fuzz_uri]="src/uri.c src/log.c"
    [fuzz_config]="src/config.c src/config_subst.c src/config_lines.c src/config_resil.c src/resil.c src/balance.c src/breaker.c src/accesslog.c src/tls.c src/addr.c src/router.c src/uri.c src/http1.c src/log.c tests/fuzz/no_modules.c"
    [fuzz_jwt]="src/log.c"
)
# pkg-config packages a target needs.
declare -A PKGS=(
    [fuzz_config]="jansson openssl"
    [fuzz_jwt]="jansson openssl libevent libevent_openssl"
)

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
CC=${CC:-clang}
# shellcheck disable=SC2054 # the commas belong to -fsanitize=
CFLAGS_FUZZ=(-std=gnu11 -g -O1 -pthread -fno-omit-frame-pointer
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
    -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION -I"$ROOT/src")

if [[ -n ${FUZZ_OUT:-} ]]; then
    OUT=$FUZZ_OUT
    mkdir -p "$OUT"
else
    OUT=$(mktemp -d /tmp/portico-fuzz.XXXXXX)
fi
OUT=$(cd "$OUT" && pwd)

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    targets=()
    for f in tests/fuzz/fuzz_*.c; do
        [[ -e $f ]] && targets+=("$(basename "$f" .c)")
    done
fi
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "fuzz: no tests/fuzz/fuzz_*.c targets found" >&2
    [[ -n ${FUZZ_RESULTS:-} ]] && echo "FAIL fuzz: no targets found" >>"$FUZZ_RESULTS"
    exit 1
fi

passed=0
failed=0
result() { # result PASS|FAIL target [why]
    local line="$1 $2${3:+: $3}"
    echo "fuzz: $line"
    [[ -n ${FUZZ_RESULTS:-} ]] && echo "$line" >>"$FUZZ_RESULTS"
    if [[ $1 == PASS ]]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

seed_dir() {
    local t=$1 d
    for d in "tests/fuzz/corpus/$t" "tests/fuzz/corpus/${t#fuzz_}"; do
        [[ -d $d ]] && { echo "$d"; return 0; }
    done
    return 1
}

dict_file() {
    local t=$1 f
    for f in "tests/fuzz/$t.dict" "tests/fuzz/${t#fuzz_}.dict"; do
        [[ -f $f ]] && { echo "$f"; return 0; }
    done
    return 1
}

build_target() { # build_target target -> binary path on stdout
    local t=$1 srcs pkgflags=()
    srcs=${SOURCES[$t]}
    if [[ -n ${PKGS[$t]:-} ]]; then
        # shellcheck disable=SC2207
        pkgflags=($(pkg-config --cflags --libs ${PKGS[$t]}))
    fi
    # shellcheck disable=SC2086
    "$CC" "${CFLAGS_FUZZ[@]}" -o "$OUT/bin/$t" "tests/fuzz/$t.c" $srcs "${pkgflags[@]}" \
        >"$OUT/logs/$t.build.log" 2>&1
}

# The start of the first report (the stack that matters), then the end of
# the log (the input that did it).
show_report() {
    local log=$1 start
    start=$(grep -n -m1 -E '==[0-9]+==ERROR|runtime error:|ERROR: libFuzzer|^==[0-9]+== ERROR' "$log" |
        cut -d: -f1 || true)
    if [[ -n $start ]]; then
        echo "---- $log, from line $start:"
        sed -n "${start},$((start + 40))p" "$log"
        echo "---- ..."
    fi
    echo "---- end of $log:"
    tail -n 12 "$log"
}

run_target() {
    local t=$1 seeds dict log work
    if [[ ! -f tests/fuzz/$t.c ]]; then
        result FAIL "$t" "tests/fuzz/$t.c does not exist"
        return
    fi
    if [[ -z ${SOURCES[$t]+set} ]]; then
        result FAIL "$t" "no source list: add it to SOURCES in tests/fuzz/run.sh"
        return
    fi
    if ! seeds=$(seed_dir "$t"); then
        result FAIL "$t" "no seed corpus (tests/fuzz/corpus/$t/)"
        return
    fi
    echo "fuzz: building $t (${SOURCES[$t]})"
    if ! build_target "$t"; then
        cat "$OUT/logs/$t.build.log" >&2
        result FAIL "$t" "build failed ($OUT/logs/$t.build.log)"
        return
    fi
    work="$OUT/corpus/$t"
    rm -rf "$work"
    mkdir -p "$work" "$OUT/artifacts/$t"
    cp -R "$seeds/." "$work/"
    local nseeds
    nseeds=$(find "$work" -type f | wc -l)
    local args=(-max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048
        -print_final_stats=1 -artifact_prefix="$OUT/artifacts/$t/")
    if dict=$(dict_file "$t"); then
        args+=(-dict="$dict")
    fi
    log="$OUT/logs/$t.log"
    echo "fuzz: running $t for ${FUZZ_SECONDS}s ($nseeds seeds from $seeds${dict:+, dict $dict})"
    local rc=0
    ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} \
    UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
        "$OUT/bin/$t" "${args[@]}" "$work" </dev/null >"$log" 2>&1 || rc=$?
    # One line of what was achieved: executions, speed, coverage.
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added):' "$log" |
        sed 's/^stat::/    /' | tr '\n' ' ' || true
    echo
    local artifacts
    artifacts=$(find "$OUT/artifacts/$t" -type f | head -5)
    if [[ $rc -ne 0 || -n $artifacts ]]; then
        show_report "$log"
        for a in $artifacts; do
            echo "fuzz: reproduce with: $OUT/bin/$t $a"
        done
        result FAIL "$t" "exit $rc${artifacts:+, artifacts in $OUT/artifacts/$t}"
        return
    fi
    result PASS "$t"
}

mkdir -p "$OUT/bin" "$OUT/logs" "$OUT/corpus" "$OUT/artifacts"
for t in "${targets[@]}"; do
    run_target "$t"
done

echo "fuzz: $passed passed, $failed failed (work directory: $OUT)"
if [[ $failed -ne 0 ]]; then
    exit 1
fi
# A temp directory of our own is removed when everything passed.
if [[ -z ${FUZZ_OUT:-} ]]; then
    rm -rf "$OUT"
fi
