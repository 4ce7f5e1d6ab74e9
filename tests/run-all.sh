#!/usr/bin/env bash
# The README's second command, and what CI runs (.ci/run): install the
# dependencies, build, and run every test tier. Stops at the first failing
# step; the last line is always "N passed, M failed" over unit test
# programs, e2e tests (both runs) and fuzz targets.
#
# Steps: deps, style (warns only), release build, unit tests, e2e tests,
# the Debian package (build, install, check), ASan+UBSan build with its
# unit and e2e tests, fuzzing, make distcheck.
#
# Environment:
#   JOBS=2             parallel make jobs
#   FUZZ_SECONDS=60    seconds per fuzz target
#   E2E_TIMEOUT=1200   seconds before an e2e run is killed
#   SKIP_DISTCHECK=1   skip make distcheck
#   PORTICO_CI_DEB=1   build, install (dpkg -i) and check the .deb even when
#                      CI is not set; it runs only as root, and changes the
#                      machine (CI's is thrown away): without CI=1/true or
#                      this, the step says so and skips
#
# Builds go to ./build and ./build-asan (out of tree). An in-tree build left
# by scripts/dev-start.sh is cleaned first (make distclean): autotools
# refuses an out-of-tree build beside a configured source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=/usr/bin/python3
JOBS=${JOBS:-2}
E2E_TIMEOUT=${E2E_TIMEOUT:-1200}
export FUZZ_SECONDS=${FUZZ_SECONDS:-60}
# pytest must not leave caches in the source tree (it is shipped by make dist).
export PYTHONDONTWRITEBYTECODE=1

SAN_ENV=(ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1)

# One "PASS item" / "FAIL item: why" line per counted item.
RESULTS=$(mktemp /tmp/portico-results.XXXXXX)
CURRENT_STEP=""
STEP_NO=0
STEP_TOTAL=11
T_START=$SECONDS

pass() { echo "PASS $*" >>"$RESULTS"; }
fail() { echo "FAIL $*" >>"$RESULTS"; }
nfail() { grep -c '^FAIL' "$RESULTS" || true; }

step() { # step "title" function [args...]
    local title=$1 t0 before
    shift
    STEP_NO=$((STEP_NO + 1))
    CURRENT_STEP=$title
    echo
    echo "================================================================"
    echo "==== [$STEP_NO/$STEP_TOTAL] $title   ($(date +%H:%M:%S))"
    echo "================================================================"
    t0=$SECONDS
    before=$(nfail)
    "$@"
    # A step that recorded failures stops the run even if it returned 0.
    if [[ $(nfail) -ne $before ]]; then
        echo "---- $title: FAILED ($((SECONDS - t0))s)"
        CURRENT_STEP=""
        exit 1
    fi
    echo "---- $title: ok ($((SECONDS - t0))s)"
    CURRENT_STEP=""
}

summary() {
    local rc=$?
    set +e
    # A step that died on a command (build error, ...) without recording a
    # failure of its own is counted as one failed item.
    if [[ -n $CURRENT_STEP ]]; then
        echo "---- $CURRENT_STEP: FAILED"
        [[ $rc -ne 0 ]] || rc=1
        grep -q '^FAIL' "$RESULTS" || fail "step: $CURRENT_STEP"
    fi
    local npass nfailed
    npass=$(grep -c '^PASS' "$RESULTS")
    nfailed=$(grep -c '^FAIL' "$RESULTS")
    echo
    echo "================================================================"
    echo "==== summary ($((SECONDS - T_START))s)"
    if [[ $nfailed -gt 0 ]]; then
        echo "failed:"
        sed -n 's/^FAIL /  /p' "$RESULTS"
        [[ $rc -ne 0 ]] || rc=1
    fi
    rm -f "$RESULTS"
    echo "$npass passed, $nfailed failed"
    exit "$rc"
}
trap summary EXIT

# ---------------------------------------------------------------- steps

do_deps() {
    bash scripts/install-deps.sh
}

do_style() {
    local out
    out=$(mktemp)
    if clang-format --dry-run --Werror src/*.c src/*.h tests/unit/*.c >"$out" 2>&1; then
        echo "style: all files match .clang-format"
    else
        local files
        files=$(grep -oE '^[^:]+\.[ch]:' "$out" | sort -u | tr -d ':' | tr '\n' ' ')
        echo "WARNING (not failing yet): these files differ from .clang-format:"
        echo "  $files"
        echo "  first differences:"
        head -n 20 "$out" | sed 's/^/    /'
        echo "  fix with: clang-format -i src/*.c src/*.h tests/unit/*.c"
    fi
    rm -f "$out"
}

do_build() {
    if [[ -f config.status ]]; then
        echo "build: cleaning the in-tree build (make distclean) to build out of tree"
        make distclean >/dev/null
    fi
    autoreconf -fi
    mkdir -p build
    (cd build && ../configure -q && make -j"$JOBS")
}

# count_unit DIR LABEL: count test programs from DIR's test-suite.log.
count_unit() {
    local dir=$1 label=$2 log=$1/test-suite.log
    if [[ ! -f $log ]]; then
        fail "$label: no $log (the tests did not build?)"
        return
    fi
    local total npass nxfail
    total=$(sed -n 's/^# TOTAL: *//p' "$log")
    npass=$(sed -n 's/^# PASS: *//p' "$log")
    nxfail=$(sed -n 's/^# XFAIL: *//p' "$log")
    if [[ ${total:-0} -eq 0 ]]; then
        fail "$label: no unit test programs ran"
        return
    fi
    local i
    for ((i = 0; i < npass + nxfail; i++)); do pass "$label"; done
    # Failed programs appear as "FAIL: name" / "ERROR: name" / "XPASS: name".
    sed -n -E 's/^(FAIL|ERROR|XPASS): (.*)$/\1 \2/p' "$log" | while read -r kind name; do
        fail "$label: $name ($kind, see $log)"
    done
}

run_unit() { # run_unit BUILDDIR LABEL [env...]
    local dir=$1 label=$2 rc=0
    shift 2
    (cd "$dir" && env "$@" make -j"$JOBS" check) || rc=$?
    count_unit "$dir" "$label"
    if [[ $rc -ne 0 ]] && ! grep -q "^FAIL $label" "$RESULTS"; then
        fail "$label: make check exited $rc"
    fi
}

# run_e2e LABEL BIN LOGDIR [env...]: the e2e suite against BIN.
run_e2e() {
    local label=$1 bin=$2 logdir=$3 xml rc=0
    shift 3
    xml="$(dirname "$logdir")/$label.junit.xml"
    rm -rf "$logdir" "$xml"
    mkdir -p "$logdir"
    echo "e2e: PORTICO_BIN=$bin PORTICO_E2E_LOGDIR=$logdir"
    env PORTICO_BIN="$bin" PORTICO_E2E_LOGDIR="$logdir" "$@" \
        timeout --kill-after=30 "$E2E_TIMEOUT" \
        "$PY" -m pytest -q -rfE -p no:cacheprovider --junitxml="$xml" tests/e2e </dev/null || rc=$?
    case $rc in
        0 | 1) ;;
        5) fail "$label: no tests collected (pytest exit 5)"; return ;;
        124 | 137) fail "$label: killed after ${E2E_TIMEOUT}s (E2E_TIMEOUT)"; return ;;
        *) fail "$label: pytest exited $rc" ;;
    esac
    if [[ ! -f $xml ]]; then
        fail "$label: pytest wrote no report"
        return
    fi
    # Passed tests, then one line per failed or erroring test.
    "$PY" - "$xml" "$label" >>"$RESULTS" <<'EOF'
import sys
import xml.etree.ElementTree as ET
xml, label = sys.argv[1], sys.argv[2]
for case in ET.parse(xml).getroot().iter("testcase"):
    name = "%s::%s" % (case.get("classname", ""), case.get("name", ""))
    bad = [c for c in case if c.tag in ("failure", "error")]
    skipped = any(c.tag == "skipped" for c in case)
    if bad:
        print("FAIL %s: %s (%s)" % (label, name, bad[0].tag))
    elif not skipped:
        print("PASS %s" % label)
EOF
    if [[ $rc -eq 1 ]] && ! grep -q "^FAIL $label" "$RESULTS"; then
        fail "$label: pytest reported failure"
    fi
}

# Any sanitizer report in the daemon's logs fails the run, even one the
# tests did not notice (a leak reported at exit, a report in a child).
check_sanitizer_logs() {
    local logdir=$1 label=$2 bad
    if [[ -z $(find "$logdir" -type f 2>/dev/null | head -1) ]]; then
        fail "$label: no daemon logs in $logdir (e2e fixtures must write portico's stderr under \$PORTICO_E2E_LOGDIR)"
        return
    fi
    bad=$(grep -rlE 'ERROR: AddressSanitizer|runtime error:|LeakSanitizer' "$logdir" || true)
    if [[ -n $bad ]]; then
        local f
        for f in $bad; do
            echo "---- sanitizer report in $f:"
            grep -m1 -n -A30 -E 'ERROR: AddressSanitizer|runtime error:|LeakSanitizer' "$f" || true
            fail "$label: sanitizer report in $f"
        done
    else
        echo "sanitizers: no reports in $(find "$logdir" -type f | wc -l) daemon log files"
    fi
}

do_unit() {
    run_unit build unit
}

do_e2e() {
    run_e2e e2e "$ROOT/build/src/portico" "$ROOT/build/e2e-logs"
}

# The .deb as CI ships it: build it (a release build; the tests ran above,
# so none inside dpkg-buildpackage), install it into this machine, and
# check what got installed: the config passes portico -t, it is a
# conffile, the service user exists, systemd-analyze verify accepts the
# unit, lintian finds no error. When systemd runs the machine, the service
# is also started, asked for its page, reloaded and stopped.
do_deb() {
    if [[ $(id -u) -ne 0 ]] || [[ ${CI:-} != 1 && ${CI:-} != true && ${PORTICO_CI_DEB:-} != 1 ]]; then
        echo "deb: skipped: it installs the package into this machine (dpkg -i), so it runs only"
        echo "     as root on a throwaway machine: CI=1 (or true), or PORTICO_CI_DEB=1"
        return
    fi
    local out=$ROOT/build/deb deb unit=/lib/systemd/system/portico.service
    rm -rf "$out"
    if ! deb=$(DEB_BUILD_OPTIONS="nocheck parallel=$JOBS" bash packaging/build-deb.sh "$out" | tail -n 1) ||
        [[ ! -f $deb ]]; then
        fail "deb: packaging/build-deb.sh built no .deb"
        return
    fi
    pass "deb: build"
    echo "deb: $deb"
    dpkg-deb -c "$deb"
    if ! dpkg -i "$deb"; then
        fail "deb: dpkg -i $deb"
        return
    fi
    pass "deb: install"
    if /usr/sbin/portico -t -c /etc/portico/portico.json; then
        pass "deb: portico -t on the installed config"
    else
        fail "deb: portico -t -c /etc/portico/portico.json"
    fi
    if dpkg-query -W -f='${Conffiles}\n' portico | grep -q '^ /etc/portico/portico.json '; then
        pass "deb: the config is a conffile"
    else
        fail "deb: /etc/portico/portico.json is not a conffile"
    fi
    if getent passwd portico >/dev/null; then
        pass "deb: the portico user exists"
    else
        fail "deb: postinst created no portico user"
    fi
    # Documentation=man:... is checked only where man can look it up.
    local man=()
    command -v man >/dev/null || man=(--man=no)
    if systemd-analyze verify "${man[@]}" "$unit"; then
        pass "deb: systemd-analyze verify"
    else
        fail "deb: systemd-analyze verify $unit"
    fi
    systemd-analyze security --offline=yes "$unit" 2>/dev/null | tail -n 1 || true
    if lintian --fail-on error "$deb"; then
        pass "deb: lintian (no errors)"
    else
        fail "deb: lintian reports errors"
    fi
    if [[ -d /run/systemd/system ]]; then
        local ok=1
        systemctl restart portico.service || ok=0
        sleep 1
        curl -fsS http://127.0.0.1:8080/ | grep -q 'portico is running' || ok=0
        systemctl reload portico.service || ok=0
        systemctl is-active --quiet portico.service || ok=0
        [[ $ok -eq 1 ]] || journalctl -u portico.service -n 30 --no-pager || true
        systemctl stop portico.service || ok=0
        if [[ $ok -eq 1 ]]; then
            pass "deb: the service starts sandboxed, serves, reloads, stops"
        else
            fail "deb: the service did not start, serve, reload and stop (journal above)"
        fi
    else
        echo "deb: systemd is not running this machine: the unit was verified, not started"
    fi
}

do_asan_build() {
    mkdir -p build-asan
    (cd build-asan && ../configure -q --enable-sanitizers CC=clang && make -j"$JOBS")
}

do_asan_unit() {
    run_unit build-asan unit-asan "${SAN_ENV[@]}"
}

do_asan_e2e() {
    run_e2e e2e-asan "$ROOT/build-asan/src/portico" "$ROOT/build-asan/e2e-logs" "${SAN_ENV[@]}"
    check_sanitizer_logs "$ROOT/build-asan/e2e-logs" e2e-asan
}

do_fuzz() {
    local rc=0 before
    before=$(nfail)
    rm -rf build/fuzz
    FUZZ_OUT="$ROOT/build/fuzz" FUZZ_RESULTS="$RESULTS" bash tests/fuzz/run.sh || rc=$?
    # run.sh records each target itself; this catches it dying before that.
    if [[ $rc -ne 0 && $(nfail) -eq $before ]]; then
        fail "fuzz: tests/fuzz/run.sh exited $rc"
    fi
}

do_distcheck() {
    if [[ ${SKIP_DISTCHECK:-} == 1 ]]; then
        echo "distcheck: skipped (SKIP_DISTCHECK=1)"
        return
    fi
    (cd build && make -j"$JOBS" distcheck)
}

step "install dependencies" do_deps
step "style: clang-format (warning only, does not fail yet)" do_style
step "release build (./build)" do_build
step "unit tests (release)" do_unit
step "e2e tests (release)" do_e2e
step "Debian package: build, install, check" do_deb
step "ASan+UBSan build (./build-asan, clang)" do_asan_build
step "unit tests (ASan+UBSan)" do_asan_unit
step "e2e tests (ASan+UBSan)" do_asan_e2e
step "fuzzing (${FUZZ_SECONDS}s per target)" do_fuzz
step "make distcheck" do_distcheck
