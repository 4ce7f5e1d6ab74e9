#!/usr/bin/env bash
# Portico vs nginx vs HAProxy: the same job (proxy to one keep-alive origin),
# one worker each on the same pinned core, the same load. See README.md.
#
#   bench/run.sh
#
# Environment:
#   PORTICO_BIN      the daemon (default ./build/src/portico)
#   BENCH_SECONDS    measured seconds per run (default 10)
#   BENCH_WARMUP     warm-up seconds before each run, not measured (default 2)
#   BENCH_ROUNDS     repeat everything, proxies interleaved (default 1);
#                    the table shows the median of the rounds
#   BENCH_CONNS      wrk connections (default 64)
#   BENCH_PROXIES    subset/order of "portico nginx haproxy"
#   BENCH_BUSY_POLL_US  Portico's busy_poll_us (default 50; 0: off, its
#                    default). HAProxy's busy-polling stays off: it polls
#                    even when idle, taking the shared core from the proxy
#                    being measured. See README.md.
#   BENCH_CASES      subset of "small 4k 64k close filters ratelimit jwt
#                    resilience tls tlsnew tlsfull tlsidle h2" (default: small 4k 64k close).
#                    "filters" measures Portico alone: the route without
#                    filters vs the same route with request_id, headers
#                    and cors, and prints the ratio (goal >= 0.95).
#                    "ratelimit": the route without filters vs one
#                    rate_limit kept in process vs one in Redis (a
#                    redis-server is started, on BENCH_REDIS_CPU), with
#                    Redis commands per request (goals 0.97 and 0.85);
#                    max_calls_in_flight and batch_linger_us are 1 and
#                    300 with busy polling, 0 and 0 without. "jwt": the
#                    route without auth vs jwt_auth with RS256 and ES256 tokens,
#                    with and without the verified-token cache (goal with
#                    it >= 0.90). "tls": /small with keep-alive over TLS;
#                    "tlsnew": a new TLS connection per request, as wrk
#                    makes them: it resumes the session (TLS 1.3 ticket);
#                    "tlsfull": the same with resumption turned off on a
#                    listener of its own in every proxy (a full handshake
#                    per request);
#                    request; "tlsidle": the proxies' memory with
#                    BENCH_IDLE_CONNS (5000) idle TLS connections open
#                    "resilience": the plain route (one endpoint, no
#                    retries) vs an upstream of three endpoints with
#                    retries and circuit breakers (goal >= 0.97), then
#                    the time from an endpoint's death (kill -9 under
#                    load) to the end of client-visible errors
#                    "h2": /small over HTTP/2 (TLS, ALPN h2), measured
#                    with h2load: BENCH_H2_CONNS connections (default 1)
#                    of BENCH_H2_STREAMS concurrent streams (default 100);
#                    p50 is h2load's mean, p99 is not measured (0)
#   BENCH_IDLE_CONNS idle TLS connections for tlsidle (default 5000)
#   BENCH_PORT_BASE  first of the ports used (default 18800: origin 18800,
#                    proxies 18801-18810, their TLS listeners 18811-18813,
#                    and without resumption 18814-18816)
#   BENCH_PROXY_CPU  core for the proxy under test (default 0)
#   BENCH_LOAD_CPU   core for the origin and wrk (default 1)
#   BENCH_REDIS_CPU  core for redis-server in the ratelimit case (default:
#                    the proxy's; see README.md, "Redis on the proxy's core")
#   BENCH_ORIGIN     c (default): bench/origin.c, a fixed-response server
#                    built by this script; nginx: the nginx origin of
#                    bench/conf/upstream-nginx.conf (before 27 Nov 2026)
#   BENCH_OUT        if set, the raw results (TSV) are copied there
#   BENCH_KEEP=1     keep the temp dir (configs, logs) for inspection
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=/usr/bin/python3

BENCH_SECONDS=${BENCH_SECONDS:-10}
BENCH_WARMUP=${BENCH_WARMUP:-2}
BENCH_ROUNDS=${BENCH_ROUNDS:-1}
BENCH_CONNS=${BENCH_CONNS:-64}
BENCH_BUSY_POLL_US=${BENCH_BUSY_POLL_US:-50}
[[ $BENCH_BUSY_POLL_US =~ ^[0-9]+$ ]] || { echo "BENCH_BUSY_POLL_US: a number" >&2; exit 2; }
# rate_limit's max_calls_in_flight and batch_linger_us as docs/config.md
# advises: 1 and 300 us with busy polling (the answer is seen at once, so
# batches grow instead of calls multiplying), neither without it.
# BENCH_RL_IN_FLIGHT and BENCH_RL_LINGER_US override them.
RL_IN_FLIGHT=0 RL_LINGER_US=0
((BENCH_BUSY_POLL_US == 0)) || RL_IN_FLIGHT=1 RL_LINGER_US=300
RL_IN_FLIGHT=${BENCH_RL_IN_FLIGHT:-$RL_IN_FLIGHT}
RL_LINGER_US=${BENCH_RL_LINGER_US:-$RL_LINGER_US}
[[ $RL_IN_FLIGHT =~ ^[0-9]+$ ]] || { echo "BENCH_RL_IN_FLIGHT: a number" >&2; exit 2; }
[[ $RL_LINGER_US =~ ^[0-9]+$ ]] || { echo "BENCH_RL_LINGER_US: a number" >&2; exit 2; }
read -r -a PROXIES <<<"${BENCH_PROXIES:-portico nginx haproxy}"
read -r -a CASES <<<"${BENCH_CASES:-small 4k 64k close}"
PROXY_CPU=${BENCH_PROXY_CPU:-0}
LOAD_CPU=${BENCH_LOAD_CPU:-1}
REDIS_CPU=${BENCH_REDIS_CPU:-$PROXY_CPU}
BENCH_ORIGIN=${BENCH_ORIGIN:-c}
PORTICO_BIN=${PORTICO_BIN:-$ROOT/build/src/portico}

B=${BENCH_PORT_BASE:-18800}
PORT_ORIGIN=$B
declare -A PORT=([portico]=$((B + 1)) [nginx]=$((B + 2)) [haproxy]=$((B + 3)))
# TLS listeners of the same processes, used by the tls* cases only.
declare -A TLSPORT=([portico]=$((B + 11)) [nginx]=$((B + 12)) [haproxy]=$((B + 13)))
# ... and their TLS listeners without session resumption (case tlsfull): +3.
declare -A TLSFULLPORT=([portico]=$((B + 14)) [nginx]=$((B + 15)) [haproxy]=$((B + 16)))
BENCH_IDLE_CONNS=${BENCH_IDLE_CONNS:-5000}
ORIGIN="127.0.0.1:$PORT_ORIGIN"

die() { echo "bench: $*" >&2; exit 1; }
log() { echo "bench: $*" >&2; }

# ---------------------------------------------------------------- checks

for tool in nginx haproxy wrk curl taskset; do
    command -v "$tool" >/dev/null || die "$tool not found: run scripts/install-deps.sh"
done
for p in "${PROXIES[@]}"; do
    [[ -n ${PORT[$p]:-} ]] || die "unknown proxy '$p' in BENCH_PROXIES"
done
FILTERS=0
RATELIMIT=0
JWT=0
TLS=0
IDLE=0
RESIL=0
CMP_CASES=() # the cases that compare the proxies with wrk (not "filters", "tlsidle", ...)
for c in "${CASES[@]}"; do
    case $c in
        small | 4k | 64k | close) CMP_CASES+=("$c") ;;
        tls | tlsnew | tlsfull)
            CMP_CASES+=("$c")
            TLS=1
            ;;
        h2)
            command -v h2load >/dev/null || die "the h2 case needs h2load: apt-get install nghttp2-client"
            CMP_CASES+=("$c")
            TLS=1
            ;;
        tlsidle)
            TLS=1
            IDLE=1
            ;;
        filters) FILTERS=1 ;;
        ratelimit) RATELIMIT=1 ;;
        jwt) JWT=1 ;;
        resilience) RESIL=1 ;;
        *) die "unknown case '$c' in BENCH_CASES" ;;
    esac
done
# Only "filters": no other proxy needs to run.
((${#CMP_CASES[@]} || IDLE)) || PROXIES=()
if ((FILTERS)); then
    # The filtered twin of "portico": same binary and route, plus filters.
    PORT[portico_filters]=$((B + 4))
    FILTER_ORIGIN="https://app.example.com" # allowed by bench/conf/portico-filters.json
fi
if ((RATELIMIT)); then
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
        die "the ratelimit case needs redis-server and redis-cli"
    PORT[portico_rl_local]=$((B + 5))
    PORT[portico_rl_redis]=$((B + 6))
    PORT_REDIS=$((B + 7))
fi
# The jwt case's runners: one Portico (portico_jwt), one route each.
JWT_RUNNERS=(jwt_none jwt_rs jwt_rs_nocache jwt_es jwt_es_nocache)
declare -A RUNNER_PROC=()
if ((JWT)); then
    PORT[portico_jwt]=$((B + 8))
    for r in "${JWT_RUNNERS[@]}"; do RUNNER_PROC[$r]=portico_jwt; done
fi
if ((RESIL)); then
    PORT[portico_resil]=$((B + 9))
    PORT_DYING=$((B + 10)) # the endpoint the death measurement kills
fi
if [[ " ${PROXIES[*]} " == *" portico "* ]] || ((FILTERS)) || ((RATELIMIT)) || ((JWT)) || ((RESIL)); then
    [[ -x $PORTICO_BIN ]] || die "no Portico binary at $PORTICO_BIN: build it (tests/run-all.sh or \
cd build && ../configure && make) or set PORTICO_BIN"
fi
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$PORT_ORIGIN" "${PORT[@]}" "${TLSPORT[@]}" "${TLSFULLPORT[@]}" ${PORT_REDIS:-} ${PORT_DYING:-}; do
    ! port_busy "$port" || die "port $port is already in use; stop whatever listens there"
done
ncpu=$(nproc)
((PROXY_CPU < ncpu && LOAD_CPU < ncpu && REDIS_CPU < ncpu)) || die "need CPUs $PROXY_CPU, $LOAD_CPU and $REDIS_CPU; this machine has $ncpu"
[[ $PROXY_CPU != "$LOAD_CPU" ]] || log "warning: proxy and load share CPU $PROXY_CPU"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---------------------------------------------------------------- processes

TMP=$(mktemp -d /tmp/portico-bench.XXXXXX)
declare -A PID=()

cleanup() {
    local name pid
    for name in "${!PID[@]}"; do
        pid=${PID[$name]}
        kill -TERM "$pid" 2>/dev/null || true
    done
    for name in "${!PID[@]}"; do
        pid=${PID[$name]}
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) did not stop on SIGTERM; killing it"
            pkill -KILL -P "$pid" 2>/dev/null || true
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${BENCH_KEEP:-} == 1 ]]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# render TEMPLATE OUT DIR PORT [TLSPORT]: fill a bench/conf template; with
# the TLS cases, "#TLS " lines are kept and Portico gets a TLS listener.
render() {
    local user="" tls_on=() tls_listener=""
    # nginx started as root would switch its worker to "nobody", which cannot
    # read our private temp dir; as any other user the directive is moot.
    [[ $(id -u) -ne 0 ]] || user="user root;"
    if ((TLS)) && [[ -n ${5:-} ]]; then
        tls_on=(-e 's|^\([[:space:]]*\)#TLS |\1|')
        tls_listener=", { \"address\": \"127.0.0.1:$5\", \"tls\": { \"certificates\": [ { \"cert\": \"$TMP/tls/cert.pem\", \"key\": \"$TMP/tls/key.pem\" } ] } }"
        tls_listener+=", { \"address\": \"127.0.0.1:$(($5 + 3))\", \"tls\": { \"certificates\": [ { \"cert\": \"$TMP/tls/cert.pem\", \"key\": \"$TMP/tls/key.pem\" } ], \"session_tickets\": false, \"session_cache\": 0 } }"
    fi
    sed -e "s|@DIR@|$3|g" -e "s|@PORT@|$4|g" -e "s|@UPSTREAM@|$ORIGIN|g" \
        -e "s|@USER@|$user|g" -e "s|@REDIS@|${PORT_REDIS:-0}|g" \
        -e "s|@BUSY_POLL_US@|$BENCH_BUSY_POLL_US|g" -e "s|@RL_IN_FLIGHT@|$RL_IN_FLIGHT|g" \
        -e "s|@RL_LINGER_US@|$RL_LINGER_US|g" \
        -e "s|@ORIGIN_PORT@|$PORT_ORIGIN|g" -e "s|@DYING_PORT@|${PORT_DYING:-0}|g" -e "s|@TLSPORT@|${5:-}|g" -e "s|@TLSFULLPORT@|$((${5:-0} + 3))|g" -e "s|@TLSDIR@|$TMP/tls|g" \
        -e "s|@TLS_LISTENER@|$tls_listener|g" "${tls_on[@]}" "$ROOT/bench/conf/$1" >"$2"
}

# One ECDSA P-256 certificate for every proxy: the same key exchange,
# signature and (TLS 1.3 default) cipher on all three.
make_cert() {
    mkdir -p "$TMP/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=bench.test -addext subjectAltName=DNS:bench.test,IP:127.0.0.1 \
        -keyout "$TMP/tls/key.pem" -out "$TMP/tls/cert.pem" >/dev/null 2>&1 ||
        die "openssl cannot make the bench certificate"
    cat "$TMP/tls/cert.pem" "$TMP/tls/key.pem" >"$TMP/tls/haproxy.pem"
}

# start NAME CPU LOGFILE command...: run in the background, pinned, in a
# session of its own as a daemon would be. With the kernel's autogroups
# (sched_autogroup_enabled), the processes of one session share one
# scheduling group: an origin started in wrk's session was preempted by wrk
# once per response (0.84 switches per request on the load core in `4k`),
# which made the load core, not the proxy, what the case measured.
start() {
    local name=$1 cpu=$2 logf=$3
    shift 3
    taskset -c "$cpu" setsid "$@" </dev/null >"$logf" 2>&1 &
    PID[$name]=$!
}

# wait_up NAME PORT LOGFILE: until the port accepts, or fail with the log.
wait_up() {
    local name=$1 port=$2 logf=$3
    for _ in $(seq 100); do
        if ! kill -0 "${PID[$name]}" 2>/dev/null; then
            cat "$logf" >&2 || true
            die "$name exited at start (log above: $logf)"
        fi
        port_busy "$port" && return 0
        sleep 0.05
    done
    cat "$logf" >&2 || true
    die "$name does not listen on port $port after 5 s (log above)"
}

start_nginx() { # start_nginx NAME TEMPLATE PORT CPU [TLSPORT]
    local name=$1 dir=$TMP/$1
    mkdir -p "$dir"
    render "$2" "$dir/nginx.conf" "$dir" "$3" "${5:-}"
    start "$name" "$4" "$dir/stderr.log" \
        nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;'
    wait_up "$name" "$3" "$dir/error.log"
}

# The origin: bench/origin.c (default), built here, or nginx
# (BENCH_ORIGIN=nginx, bench/conf/upstream-nginx.conf). Both answer /small
# from memory and /4k.bin, /64k.bin with the same files' bytes.
start_origin() {
    mkdir -p "$TMP/origin/www"
    head -c 4096 /dev/urandom >"$TMP/origin/www/4k.bin"
    head -c 65536 /dev/urandom >"$TMP/origin/www/64k.bin"
    printf 'hello from the bench origin\n' >"$TMP/origin/small.expected"
    case $BENCH_ORIGIN in
        c)
            ${CC:-cc} -O2 -Wall -Wextra -Werror -o "$TMP/origin/origin" "$ROOT/bench/origin.c" \
                >"$TMP/origin/cc.log" 2>&1 || die "cannot build bench/origin.c: $(cat "$TMP/origin/cc.log")"
            start origin "$LOAD_CPU" "$TMP/origin/stderr.log" "$TMP/origin/origin" -p "$PORT_ORIGIN" \
                -l 127.0.0.1 -l 127.0.0.2 -l 127.0.0.3 -d "$TMP/origin/www"
            wait_up origin "$PORT_ORIGIN" "$TMP/origin/stderr.log"
            ;;
        nginx) start_nginx origin upstream-nginx.conf "$PORT_ORIGIN" "$LOAD_CPU" ;;
        *) die "BENCH_ORIGIN must be c or nginx, not $BENCH_ORIGIN" ;;
    esac
}

start_proxy() {
    local p=$1 dir=$TMP/$1
    case $p in
        nginx) start_nginx nginx proxy-nginx.conf "${PORT[nginx]}" "$PROXY_CPU" "${TLSPORT[nginx]}" ;;
        haproxy)
            mkdir -p "$dir"
            render haproxy.cfg "$dir/haproxy.cfg" "$dir" "${PORT[haproxy]}" "${TLSPORT[haproxy]}"
            haproxy -c -q -f "$dir/haproxy.cfg" || die "haproxy rejects $dir/haproxy.cfg"
            start haproxy "$PROXY_CPU" "$dir/haproxy.log" haproxy -f "$dir/haproxy.cfg" -db
            wait_up haproxy "${PORT[haproxy]}" "$dir/haproxy.log"
            ;;
        portico)
            mkdir -p "$dir"
            render portico.json "$dir/portico.json" "$dir" "${PORT[portico]}" "${TLSPORT[portico]}"
            start portico "$PROXY_CPU" "$dir/portico.log" "$PORTICO_BIN" -c "$dir/portico.json"
            wait_up portico "${PORT[portico]}" "$dir/portico.log"
            ;;
        portico_jwt)
            mkdir -p "$dir"
            make_jwt_tokens "$dir"
            render portico-jwt.json "$dir/portico.json" "$dir" "${PORT[$p]}"
            "$PORTICO_BIN" -t -c "$dir/portico.json" >"$dir/check.log" 2>&1 ||
                die "portico rejects $dir/portico.json (is jwt_auth built in?): $(cat "$dir/check.log")"
            start "$p" "$PROXY_CPU" "$dir/portico.log" "$PORTICO_BIN" -c "$dir/portico.json"
            wait_up "$p" "${PORT[$p]}" "$dir/portico.log"
            ;;
        portico_resil)
            mkdir -p "$dir"
            render portico-resil.json "$dir/portico.json" "$dir" "${PORT[$p]}"
            "$PORTICO_BIN" -t -c "$dir/portico.json" >"$dir/check.log" 2>&1 ||
                die "portico rejects $dir/portico.json: $(cat "$dir/check.log")"
            start "$p" "$PROXY_CPU" "$dir/portico.log" "$PORTICO_BIN" -c "$dir/portico.json"
            wait_up "$p" "${PORT[$p]}" "$dir/portico.log"
            ;;
        portico_filters)
            mkdir -p "$dir"
            render portico-filters.json "$dir/portico.json" "$dir" "${PORT[$p]}"
            "$PORTICO_BIN" -t -c "$dir/portico.json" >"$dir/check.log" 2>&1 ||
                die "portico rejects $dir/portico.json (are request_id, headers and cors built in?): $(cat "$dir/check.log")"
            start "$p" "$PROXY_CPU" "$dir/portico.log" "$PORTICO_BIN" -c "$dir/portico.json"
            wait_up "$p" "${PORT[$p]}" "$dir/portico.log"
            ;;
        portico_rl_local | portico_rl_redis)
            mkdir -p "$dir"
            local tpl=portico-rl-local.json
            [[ $p == portico_rl_local ]] || tpl=portico-rl-redis.json
            render "$tpl" "$dir/portico.json" "$dir" "${PORT[$p]}"
            "$PORTICO_BIN" -t -c "$dir/portico.json" >"$dir/check.log" 2>&1 ||
                die "portico rejects $dir/portico.json (is rate_limit built in?): $(cat "$dir/check.log")"
            start "$p" "$PROXY_CPU" "$dir/portico.log" "$PORTICO_BIN" -c "$dir/portico.json"
            wait_up "$p" "${PORT[$p]}" "$dir/portico.log"
            ;;
    esac
}

# make_jwt_tokens DIR: an RSA and a P-256 key pair (public halves for the
# providers) and one long-lived token for each, made with python3 and the
# openssl command.
make_jwt_tokens() {
    local d=$1
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$d/rs.key" 2>/dev/null
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/es.key" 2>/dev/null
    openssl pkey -in "$d/rs.key" -pubout -out "$d/rs.pub"
    openssl pkey -in "$d/es.key" -pubout -out "$d/es.pub"
    "$PY" - "$d" <<'PYEOF'
import base64, json, subprocess, sys, time
d = sys.argv[1]
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
claims = {"iss": "bench", "aud": "api", "sub": "bench-user", "exp": int(time.time()) + 86400,
          "iat": int(time.time()) - 10, "scope": "read write"}
for alg, key in (("RS256", "rs"), ("ES256", "es")):
    msg = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", "%s/%s.key" % (d, key)],
                         input=msg.encode(), capture_output=True, check=True).stdout
    if alg == "ES256":  # DER SEQUENCE{r, s} -> r||s
        i, raw = 2, b""
        for _ in range(2):
            n = sig[i + 1]
            raw += sig[i + 2:i + 2 + n].lstrip(b"\0").rjust(32, b"\0")
            i += 2 + n
        sig = raw
    open("%s/%s.token" % (d, key), "w").write(msg + "." + b64(sig))
PYEOF
}

# jwt_path_of RUNNER / jwt_token_of RUNNER: what the jwt case's runner asks.
jwt_path_of() {
    case $1 in
        jwt_none) echo /small ;;
        jwt_rs) echo /rs/small ;;
        jwt_rs_nocache) echo /rs-nocache/small ;;
        jwt_es) echo /es/small ;;
        jwt_es_nocache) echo /es-nocache/small ;;
    esac
}
jwt_token_of() {
    # jwt_none sends a token too (ignored): the same request bytes as jwt_rs
    case $1 in jwt_none | jwt_rs*) cat "$TMP/portico_jwt/rs.token" ;; jwt_es*) cat "$TMP/portico_jwt/es.token" ;; esac
}

# verify_jwt PORT: each jwt route answers the origin's body with its token,
# and 401 without one.
verify_jwt() {
    local r url code got=$TMP/verify.body
    for r in "${JWT_RUNNERS[@]}"; do
        url="http://127.0.0.1:$1$(jwt_path_of "$r")"
        code=$(curl -sS --max-time 5 -H "Authorization: Bearer $(jwt_token_of "$r")" -o "$got" \
            -w '%{http_code}' "$url" 2>&1) || die "$r: GET $url failed: $code"
        [[ $code == 200 ]] && cmp -s "$got" "$TMP/origin/small.expected" ||
            die "$r: GET $url with its token answered $code, not the origin's body"
        [[ $r == jwt_none ]] && continue
        code=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "$url" 2>&1)
        [[ $code == 401 ]] || die "$r: GET $url without a token answered $code, expected 401"
    done
}

# ---------------------------------------------------------------- correctness

path_of() {
    case $1 in small | close | filters | ratelimit | resilience | tls* | h2) echo /small ;; 4k) echo /4k.bin ;; 64k) echo /64k.bin ;; esac
}
expected_of() {
    case $1 in
        small | close) echo "$TMP/origin/small.expected" ;;
        4k) echo "$TMP/origin/www/4k.bin" ;;
        64k) echo "$TMP/origin/www/64k.bin" ;;
    esac
}

# verify NAME PORT: every case's URL answers 200 with the origin's exact
# body, over a reused connection and with "Connection: close".
verify() {
    local name=$1 port=$2 c url code got=$TMP/verify.body
    for c in small 4k 64k close; do
        url="http://127.0.0.1:$port$(path_of "$c")"
        local hdr=()
        [[ $c != close ]] || hdr=(-H "Connection: close")
        code=$(curl -sS --max-time 5 "${hdr[@]}" -o "$got" -w '%{http_code}' "$url" 2>&1) ||
            die "$name: GET $url failed: $code"
        [[ $code == 200 ]] || die "$name: GET $url answered $code, expected 200"
        cmp -s "$got" "$(expected_of "$c")" ||
            die "$name: GET $url: the body differs from the origin's ($(wc -c <"$got") bytes)"
    done
    # Two requests on one connection: the proxy must keep it alive.
    local out
    out=$(curl -sS --max-time 5 -o /dev/null -o /dev/null -w '%{num_connects} ' \
        "http://127.0.0.1:$port/small" "http://127.0.0.1:$port/small")
    [[ $out == "1 0 " ]] || die "$name: did not keep the client connection alive (new connects: $out)"
    ((TLS)) && [[ -n ${TLSPORT[$name]:-} ]] || return 0
    url="https://127.0.0.1:${TLSPORT[$name]}/small"
    code=$(curl -sSk --max-time 5 -o "$got" -w '%{http_code}' "$url" 2>&1) ||
        die "$name: GET $url failed: $code"
    [[ $code == 200 ]] && cmp -s "$got" "$TMP/origin/small.expected" ||
        die "$name: GET $url answered $code or a different body"
    out=$(curl -sSk --max-time 5 -o /dev/null -o /dev/null -w '%{num_connects} ' "$url" "$url")
    [[ $out == "1 0 " ]] || die "$name: did not keep the TLS connection alive (new connects: $out)"
}

# verify_filters PORT: the filters really run: each one's mark is on the
# answer to the request the "filters" case sends.
verify_filters() {
    local head=$TMP/verify.head h
    curl -sS --max-time 5 -H "Origin: $FILTER_ORIGIN" -D "$head" -o /dev/null \
        "http://127.0.0.1:$1/small" || die "portico_filters: GET /small failed"
    for h in "X-Request-Id: " "X-Served-By: portico" "Access-Control-Allow-Origin: $FILTER_ORIGIN"; do
        grep -qiF "$h" "$head" ||
            die "portico_filters: no '$h' in the answer; the filters did not run: $(cat "$head")"
    done
}

# redis_calls: EVALSHA + EVAL calls so far (INFO commandstats).
redis_calls() {
    redis-cli -p "$PORT_REDIS" INFO commandstats |
        awk -F'[=,:]' '/^cmdstat_eval(sha)?:/ {s += $3} END {print s + 0}'
}

# verify_ratelimit NAME PORT: the limits run (/over, 1 an hour, refuses
# its second request); the Redis one asks Redis once per request.
verify_ratelimit() {
    local codes before after
    [[ $1 != portico_rl_redis ]] || before=$(redis_calls)
    curl -sS --max-time 5 -o /dev/null "http://127.0.0.1:$2/small" || die "$1: GET /small failed"
    if [[ $1 == portico_rl_redis ]]; then
        after=$(redis_calls)
        [[ $((after - before)) == 1 ]] || die "$1: $((after - before)) Redis calls for one request (Redis down?)"
    fi
    codes=$(curl -sS --max-time 5 -o /dev/null -o /dev/null -w '%{http_code} ' \
        "http://127.0.0.1:$2/over" "http://127.0.0.1:$2/over")
    [[ $codes == "200 429 " ]] || die "$1: /over answered $codes, expected 200 429: the limit does not run"
}

# ---------------------------------------------------------------- measuring

# cpu_ticks PID: user+system clock ticks of a process and its children
# (nginx's worker is a child of its master; threads are in the process).
cpu_ticks() {
    local total=0 p f
    for p in "$1" $(pgrep -P "$1" || true); do
        f=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        f=${f##*) }                  # fields from 3 on; comm may hold spaces
        read -r -a a <<<"$f"
        total=$((total + a[11] + a[12])) # utime, stime (fields 14, 15)
    done
    echo "$total"
}

# h2_run PORT SECONDS OUTFILE: h2load's figures, written as wrk writes them
# (measure reads wrk's format).
h2_run() {
    local raw=$3.h2load
    taskset -c "$LOAD_CPU" h2load -t1 -c"${BENCH_H2_CONNS:-1}" -m"${BENCH_H2_STREAMS:-100}" \
        -D"$2" "https://127.0.0.1:$1/small" >"$raw" 2>&1 || { cat "$raw" >"$3"; return 1; }
    awk '
        /^finished in/ { gsub(/[^0-9.]/, "", $3); secs = $3; rps = $4 }
        /^requests:/ { done = $8; failed = $10 + $12 + $14 }
        /^status codes:/ { non2xx = $5 + $7 + $9 }
        /^time for request:/ { mean = $6 }
        END {
            printf "  %d requests in %ss\n", done, secs
            printf "Requests/sec: %s\n", rps
            printf "     50%%    %s\n     99%%    0us\n", mean
            if (non2xx) printf "  Non-2xx or 3xx responses: %d\n", non2xx
            if (failed) printf "  Socket errors: connect 0, read 0, write 0, timeout %d\n", failed
        }' "$raw" >"$3"
}

# wrk_run PORT CASE SECONDS OUTFILE [RUNNER] (the tls* cases take the TLS port)
wrk_run() {
    local url hdr=() scheme=http
    if [[ $2 == h2 ]]; then
        h2_run "$1" "$3" "$4"
        return
    fi
    [[ $2 != tls* ]] || scheme=https
    url="$scheme://127.0.0.1:$1$(path_of "$2")"
    [[ $2 != close && $2 != tlsnew && $2 != tlsfull ]] || hdr=(-H "Connection: close")
    [[ $2 != filters ]] || hdr=(-H "Origin: $FILTER_ORIGIN")
    [[ $2 != over ]] || url="http://127.0.0.1:$1/over"
    if [[ $2 == jwt ]]; then
        url="http://127.0.0.1:$1$(jwt_path_of "$5")"
        hdr=(-H "Authorization: Bearer $(jwt_token_of "$5")")
    fi
    taskset -c "$LOAD_CPU" wrk -t1 -c"$BENCH_CONNS" -d"$3"s --latency "${hdr[@]}" "$url" >"$4" 2>&1
}

# to_us VALUE: wrk's "812.00us" / "1.20ms" / "2.00s" in microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "ms") n *= 1000; else if (u == "s") n *= 1000000
        printf "%.0f", n }'
}

RESULTS=$TMP/results.tsv
printf 'case\tproxy\tround\trps\tp50_us\tp99_us\tcpu_pct\tcpu_us_per_req\terrors\n' >"$RESULTS"

measure() { # measure CASE PROXY ROUND (PROXY: a proxy, or a runner of the jwt case)
    local c=$1 p=$2 r=$3 out=$TMP/wrk-$1-$2-$3.txt proc=${RUNNER_PROC[$2]:-$2}
    local port=${PORT[$proc]}
    [[ $c != tls* && $c != h2 ]] || port=${TLSPORT[$p]}
    [[ $c != tlsfull ]] || port=${TLSFULLPORT[$p]}
    wrk_run "$port" "$c" "$BENCH_WARMUP" "$TMP/warmup.txt" "$p" ||
        die "$p/$c: wrk warm-up failed: $(cat "$TMP/warmup.txt")"
    local t0 t1 n0 n1 rc0=0 rc1=0 rt0=0 rt1=0
    [[ $p != portico_rl_redis ]] || { rc0=$(redis_calls); rt0=$(cpu_ticks "${PID[redis]}"); }
    t0=$(cpu_ticks "${PID[$proc]}")
    n0=$(date +%s%N)
    wrk_run "$port" "$c" "$BENCH_SECONDS" "$out" "$p" || die "$p/$c: wrk failed: $(cat "$out")"
    n1=$(date +%s%N)
    t1=$(cpu_ticks "${PID[$proc]}")
    [[ $p != portico_rl_redis ]] || { rc1=$(redis_calls); rt1=$(cpu_ticks "${PID[redis]}"); }
    kill -0 "${PID[$proc]}" 2>/dev/null || die "$p died during the $c run (see $TMP/$proc/)"

    local rps reqs p50 p99 non2xx sockerr
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    reqs=$(awk '/requests in/ {print $1}' "$out")
    p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$out")")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
    sockerr=$(awk '/Socket errors:/ { s = 0; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) s += $i; print s }' "$out")
    [[ -n $rps && -n $reqs ]] || die "$p/$c: cannot read wrk's output: $(cat "$out")"
    local errors=$((${non2xx:-0} + ${sockerr:-0}))
    [[ $p != portico_rl_redis ]] ||
        printf '%s\t%s\t%s\t%s\n' "$c" "$reqs" "$((rc1 - rc0))" "$((rt1 - rt0))" >>"$TMP/redis-calls.tsv"
    local hz cpu_s wall_s cpu_pct us_per_req
    hz=$(getconf CLK_TCK)
    cpu_s=$(awk -v t="$((t1 - t0))" -v hz="$hz" 'BEGIN {printf "%.3f", t / hz}')
    wall_s=$(awk -v n="$((n1 - n0))" 'BEGIN {printf "%.3f", n / 1e9}')
    cpu_pct=$(awk -v c="$cpu_s" -v w="$wall_s" 'BEGIN {printf "%.0f", 100 * c / w}')
    us_per_req=$(awk -v c="$cpu_s" -v n="$reqs" 'BEGIN {printf "%.2f", n ? 1e6 * c / n : 0}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$p" "$r" "$rps" "$p50" "$p99" \
        "$cpu_pct" "$us_per_req" "$errors" >>"$RESULTS"
    log "$(printf '%-6s %-8s round %s: %10s req/s  p50 %6s us  p99 %6s us  cpu %3s%%  %s us/req  errors %s' \
        "$c" "$p" "$r" "$rps" "$p50" "$p99" "$cpu_pct" "$us_per_req" "$errors")"
    if [[ $errors -ne 0 ]]; then
        log "warning: $p/$c had $errors errors (non-2xx or socket errors); see $out"
        cp "$out" "$TMP/errors-$c-$p-$r.txt"
    fi
}

# measure_idle PROXY: the proxy's resident memory (process and children)
# before and while BENCH_IDLE_CONNS TLS connections are open and idle, each
# after one keep-alive request.
IDLE_RESULTS=$TMP/idle.tsv
printf 'proxy\tconns\trss_before_kb\trss_idle_kb\tbytes_per_conn\n' >"$IDLE_RESULTS"
measure_idle() {
    local p=$1 line
    line=$(taskset -c "$LOAD_CPU" "$PY" - "${PID[$p]}" "${TLSPORT[$p]}" "$BENCH_IDLE_CONNS" <<'PYEOF'
import os, socket, ssl, sys, time
pid, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def rss_kb():
    pids = [pid]
    try:
        for t in os.listdir("/proc/%d/task" % pid):
            pids += [int(x) for x in open("/proc/%d/task/%s/children" % (pid, t)).read().split()]
    except OSError:
        pass
    total = 0
    for q in set(pids):
        for line in open("/proc/%d/status" % q):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
before = rss_kb()
conns = []
req = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"
for i in range(n):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="bench.test")
    s.sendall(req)
    got = b""
    while not got.endswith(b"origin\n"):
        d = s.recv(4096)
        if not d:
            sys.exit("connection %d closed by the proxy" % i)
        got += d
    conns.append(s)
time.sleep(2)
idle = rss_kb()
print("%d\t%d\t%d\t%.0f" % (len(conns), before, idle, (idle - before) * 1024.0 / len(conns)))
for s in conns:
    s.close()
PYEOF
) || die "$p/tlsidle: could not hold $BENCH_IDLE_CONNS TLS connections"
    printf '%s\t%s\n' "$p" "$line" >>"$IDLE_RESULTS"
    log "tlsidle $p: $(echo "$line" | awk -F'\t' '{printf "%d conns, RSS %d -> %d kB, %d bytes/conn", $1, $2, $3, $4}')"
    sleep 1 # let the proxy close them
}

# ---------------------------------------------------------------- main

log "temp dir $TMP; proxies on CPU $PROXY_CPU, origin and wrk on CPU $LOAD_CPU"
((!TLS)) || make_cert
start_origin
verify origin "$PORT_ORIGIN"
STARTED=("${PROXIES[@]}")
if ((FILTERS)); then
    [[ " ${STARTED[*]} " == *" portico "* ]] || STARTED+=(portico)
    STARTED+=(portico_filters)
fi
if ((RATELIMIT)); then
    [[ " ${STARTED[*]} " == *" portico "* ]] || STARTED+=(portico)
    STARTED+=(portico_rl_local portico_rl_redis)
    mkdir -p "$TMP/redis"
    # Redis runs on the proxy's core: the load's core is the one this
    # machine saturates first, and Redis there took wrk's and the origin's
    # time, which a Redis on its own host (as in production) would not;
    # on the proxy's core it takes the gateway's time instead.
    start redis "$REDIS_CPU" "$TMP/redis/redis.log" redis-server --port "$PORT_REDIS" \
        --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP/redis"
    wait_up redis "$PORT_REDIS" "$TMP/redis/redis.log"
fi
((!JWT)) || STARTED+=(portico_jwt)
if ((RESIL)); then
    [[ " ${STARTED[*]} " == *" portico "* ]] || STARTED+=(portico)
    STARTED+=(portico_resil)
fi
for p in "${STARTED[@]}"; do
    start_proxy "$p"
    verify "$p" "${PORT[$p]}"
    [[ $p != portico_filters ]] || verify_filters "${PORT[$p]}"
    [[ $p != portico_rl_* ]] || verify_ratelimit "$p" "${PORT[$p]}"
    [[ $p != portico_jwt ]] || verify_jwt "${PORT[$p]}"
    log "$p answers correctly on port ${PORT[$p]}"
done

total=$(( (${#CMP_CASES[@]} * ${#PROXIES[@]} + 2 * FILTERS + 3 * RATELIMIT + ${#JWT_RUNNERS[@]} * JWT + 2 * RESIL) * BENCH_ROUNDS * (BENCH_SECONDS + BENCH_WARMUP) + IDLE * 15 * ${#PROXIES[@]} ))
what="${CMP_CASES[*]} x ${PROXIES[*]}"
((${#CMP_CASES[@]})) || what=""
((!FILTERS)) || what="${what:+$what, }filters x portico portico_filters"
((!RATELIMIT)) || what="${what:+$what, }ratelimit x portico portico_rl_local portico_rl_redis"
((!JWT)) || what="${what:+$what, }jwt x ${JWT_RUNNERS[*]}"
((!RESIL)) || what="${what:+$what, }resilience x portico portico_resil"
log "measuring: $what x $BENCH_ROUNDS round(s), about ${total}s"
for c in "${CASES[@]}"; do
    if [[ $c == tlsidle ]]; then
        for p in "${PROXIES[@]}"; do
            measure_idle "$p"
        done
        continue
    fi
    if [[ $c == filters ]]; then
        runners=(portico portico_filters)
    elif [[ $c == ratelimit ]]; then
        runners=(portico portico_rl_local portico_rl_redis)
    elif [[ $c == jwt ]]; then
        runners=("${JWT_RUNNERS[@]}")
    elif [[ $c == resilience ]]; then
        runners=(portico portico_resil)
    else
        runners=("${PROXIES[@]}")
    fi
    for ((r = 1; r <= BENCH_ROUNDS; r++)); do
        # Rotate the order each round so no proxy always goes first.
        n=${#runners[@]}
        for ((i = 0; i < n; i++)); do
            measure "$c" "${runners[$(((i + r - 1) % n))]}" "$r"
        done
    done
done

if ((RATELIMIT)); then
    # A key known to be over its limit: refused from the worker's memo,
    # without asking Redis (every answer is a 429 here).
    before=$(redis_calls)
    wrk_run "${PORT[portico_rl_redis]}" over 3 "$TMP/wrk-over.txt" || die "over: wrk failed"
    after=$(redis_calls)
    over_reqs=$(awk '/requests in/ {print $1}' "$TMP/wrk-over.txt")
    printf 'over\t%s\t%s\t0\n' "$over_reqs" "$((after - before))" >>"$TMP/redis-calls.tsv"
fi

if ((RESIL)); then
    # An endpoint dies (kill -9) under a steady keep-alive load on the
    # "dying" upstream: count the client-visible errors and the time from
    # the kill to the last one.
    start dying "$LOAD_CPU" "$TMP/dying.log" "$PY" -S "$ROOT/tests/e2e/servers/echo.py" --port "$PORT_DYING"
    wait_up dying "$PORT_DYING" "$TMP/dying.log"
    "$PY" - "${PORT[portico_resil]}" "${PID[dying]}" >"$TMP/death.txt" <<'PYEOF' || die "death measurement failed: $(cat "$TMP/death.txt")"
import http.client, os, signal, sys, threading, time
port, victim = int(sys.argv[1]), int(sys.argv[2])
errors, t_kill, stop = [], [None], [False]
def client():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    while not stop[0]:
        try:
            c.request("GET", "/dying/small")
            r = c.getresponse()
            r.read()
            if r.status != 200:
                errors.append(time.monotonic())
        except Exception:
            errors.append(time.monotonic())
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
ts = [threading.Thread(target=client) for _ in range(8)]
for t in ts:
    t.start()
time.sleep(1.5)
t_kill[0] = time.monotonic()
os.kill(victim, signal.SIGKILL)
time.sleep(3.0)
stop[0] = True
for t in ts:
    t.join()
after = [e for e in errors if e >= t_kill[0]]
print("%d %.0f" % (len(after), 1000 * (max(after) - t_kill[0]) if after else 0))
PYEOF
    read -r DEATH_ERRORS DEATH_MS <"$TMP/death.txt"
    unset 'PID[dying]'
    printf 'death	%s	%s
' "$DEATH_ERRORS" "$DEATH_MS" >"$TMP/death.tsv"
fi

[[ -z ${BENCH_OUT:-} ]] || cp "$RESULTS" "$BENCH_OUT"
[[ -z ${BENCH_OUT:-} ]] || ((!IDLE)) || cp "$IDLE_RESULTS" "$BENCH_OUT.idle"

echo
versions="$(nginx -v 2>&1 | sed 's/.*: //'), $(haproxy -v 2>&1 | awk 'NR == 1 {print "HAProxy " $3}')"
if [[ " ${STARTED[*]} " == *" portico "* ]]; then
    versions="$("$PORTICO_BIN" --version 2>/dev/null | head -1 || echo portico), $versions"
fi
echo "$versions; wrk -t1 -c$BENCH_CONNS; ${BENCH_SECONDS}s x $BENCH_ROUNDS round(s); proxy on CPU $PROXY_CPU; Portico busy_poll_us ${BENCH_BUSY_POLL_US}; origin $BENCH_ORIGIN$( ((!RATELIMIT)) || echo "; rate_limit max_calls_in_flight $RL_IN_FLIGHT, batch_linger_us $RL_LINGER_US, Redis on CPU $REDIS_CPU")"
"$PY" - "$RESULTS" "$TMP/redis-calls.tsv" "$IDLE_RESULTS" "$TMP/death.tsv" <<'EOF'
import csv, os, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = {}
for r in rows:
    med.setdefault((r["case"], r["proxy"]), []).append(r)
def m(rs, key):
    return statistics.median(float(x[key]) for x in rs)
cases = list(dict.fromkeys(r["case"] for r in rows))
proxies = list(dict.fromkeys(r["proxy"] for r in rows))
FILTERED = "portico_filters"   # the "filters" case's twin; compared only with portico
TWINS = (FILTERED, "portico_rl_local", "portico_rl_redis", "portico_resil")
pw = max([8] + [len(p) for p in proxies])
cw = max([6] + [len(c) for c in cases])
hdr = "%-*s %-*s %11s %9s %9s %5s %11s %7s" % (cw, "case", pw, "proxy", "req/s", "p50 us", "p99 us",
                                               "cpu%", "cpu us/req", "errors")
print(hdr)
print("-" * len(hdr))
for c in cases:
    for p in proxies:
        rs = med.get((c, p))
        if not rs:
            continue
        print("%-*s %-*s %11.0f %9.0f %9.0f %5.0f %11.2f %7d" % (
            cw, c, pw, p, m(rs, "rps"), m(rs, "p50_us"), m(rs, "p99_us"), m(rs, "cpu_pct"),
            m(rs, "cpu_us_per_req"), sum(int(x["errors"]) for x in rs)))
others = [p for p in proxies if p != "portico" and p not in TWINS and not p.startswith("jwt_")]
if any(c not in ("filters", "ratelimit", "jwt", "resilience") and (c, "portico") in med for c in cases) and others:
    print()
    cols = []
    for o in others:
        cols += ["req/s vs %s" % o, "per-CPU vs %s" % o]
    print("%-6s " % "case" + " ".join("%18s" % h for h in cols))
    for c in cases:
        if (c, "portico") not in med or c in ("filters", "ratelimit", "resilience"):
            continue
        pr, pc = m(med[(c, "portico")], "rps"), m(med[(c, "portico")], "cpu_us_per_req")
        vals = []
        for o in others:
            if (c, o) not in med:
                vals += ["-", "-"]
                continue
            orps, ocpu = m(med[(c, o)], "rps"), m(med[(c, o)], "cpu_us_per_req")
            vals.append("%.2fx" % (pr / orps) if orps else "-")
            # Requests per CPU second: the inverse ratio of CPU us per request.
            vals.append("%.2fx" % (ocpu / pc) if pc else "-")
        print("%-6s " % c + " ".join("%18s" % v for v in vals))
if ("filters", "portico") in med and ("filters", FILTERED) in med:
    plain, filt = med[("filters", "portico")], med[("filters", FILTERED)]
    rps_ratio = m(filt, "rps") / m(plain, "rps") if m(plain, "rps") else 0
    cpu_ratio = m(plain, "cpu_us_per_req") / m(filt, "cpu_us_per_req") if m(filt, "cpu_us_per_req") else 0
    print()
    print("filters: Portico with request_id + headers + cors vs the same route without filters")
    # The issue's goal is on requests/s; per-CPU is shown because the load
    # side can cap requests/s before the proxy's core is saturated.
    print("  req/s %.2fx (goal >= 0.95)%s, per-CPU %.2fx" % (
        rps_ratio, "" if rps_ratio >= 0.95 else "  BELOW GOAL", cpu_ratio))
if ("ratelimit", "portico") in med:
    plain = med[("ratelimit", "portico")]
    print()
    print("ratelimit: one rate_limit filter vs the same route without filters")
    for twin, what, goal in (("portico_rl_local", "in process", 0.97),
                             ("portico_rl_redis", "in Redis", 0.85)):
        if ("ratelimit", twin) not in med:
            continue
        rs = med[("ratelimit", twin)]
        rr = m(rs, "rps") / m(plain, "rps") if m(plain, "rps") else 0
        cr = m(plain, "cpu_us_per_req") / m(rs, "cpu_us_per_req") if m(rs, "cpu_us_per_req") else 0
        print("  %-10s req/s %.2fx, per-CPU %.2fx (goal >= %.2f)%s" % (
            what, rr, cr, goal, "" if min(rr, cr) >= goal else "  BELOW GOAL"))
        # Each round measures the twin next to the plain route: the ratio
        # within a round cancels the machine's slow drift, which the
        # medians of the two series do not.
        pr = {x["round"]: float(x["rps"]) for x in plain}
        per = sorted(float(x["rps"]) / pr[x["round"]] for x in rs if pr.get(x["round"]))
        if len(per) > 1:
            print("  %-10s req/s within each round: median %.2fx (%s)" % (
                "", statistics.median(per), ", ".join("%.2f" % v for v in per)))
    try:
        calls = [ln.split("\t") for ln in open(sys.argv[2]).read().split("\n") if ln]
    except OSError:
        calls = []
    under = [(int(n), int(k), int(t)) for c, n, k, t in calls if c == "ratelimit"]
    over = [(int(n), int(k)) for c, n, k, _ in calls if c == "over"]
    if under:
        # Requests read in one loop turn share one call (a batch): <= 1.
        reqs = max(1, sum(n for n, _, _ in under))
        hz = os.sysconf("SC_CLK_TCK")
        print("  Redis commands per request under the limit: %.3f (goal <= 1); Redis CPU %.2f us/request" % (
            sum(k for _, k, _ in under) / reqs, 1e6 * sum(t for _, _, t in under) / hz / reqs))
    if over:
        print("  Redis commands per request for a key known to be over: %.4f (%d calls, %d requests)" % (
            over[0][1] / max(1, over[0][0]), over[0][1], over[0][0]))
if ("jwt", "jwt_none") in med:
    base = med[("jwt", "jwt_none")]
    print()
    print("jwt: jwt_auth vs the same Portico route without auth (goal with the cache >= 0.90)")
    for name, label in (("jwt_rs", "RS256, cache"), ("jwt_rs_nocache", "RS256, no cache"),
                        ("jwt_es", "ES256, cache"), ("jwt_es_nocache", "ES256, no cache")):
        if ("jwt", name) not in med:
            continue
        rs = med[("jwt", name)]
        rr = m(rs, "rps") / m(base, "rps") if m(base, "rps") else 0
        cr = m(base, "cpu_us_per_req") / m(rs, "cpu_us_per_req") if m(rs, "cpu_us_per_req") else 0
        below = "cache" in label and "no cache" not in label and min(rr, cr) < 0.90
        print("  %-16s req/s %.2fx, per-CPU %.2fx%s" % (label, rr, cr, "  BELOW GOAL" if below else ""))
idle = list(csv.DictReader(open(sys.argv[3]), delimiter="\t"))
if idle:
    print()
    print("tlsidle: resident memory with idle TLS connections open (after one request each)")
    print("%-8s %7s %14s %14s %15s" % ("proxy", "conns", "RSS before kB", "RSS idle kB", "bytes per conn"))
    for r in idle:
        print("%-8s %7s %14s %14s %15s" % (r["proxy"], r["conns"], r["rss_before_kb"],
                                            r["rss_idle_kb"], r["bytes_per_conn"]))
if ("resilience", "portico") in med and ("resilience", "portico_resil") in med:
    plain, res = med[("resilience", "portico")], med[("resilience", "portico_resil")]
    rr = m(res, "rps") / m(plain, "rps") if m(plain, "rps") else 0
    cr = m(plain, "cpu_us_per_req") / m(res, "cpu_us_per_req") if m(res, "cpu_us_per_req") else 0
    print()
    print("resilience: 3 endpoints with retries and breakers vs 1 endpoint without")
    print("  req/s %.2fx, per-CPU %.2fx (goal >= 0.97)%s" % (rr, cr, "" if rr >= 0.97 else "  BELOW GOAL"))
    try:
        d = open(sys.argv[4]).read().split()
        print("  an endpoint killed under load: %s client-visible errors, the last %s ms after the kill" % (d[1], d[2]))
    except (OSError, IndexError):
        pass
if any(int(r["errors"]) for r in rows):
    print("\nWARNING: some runs had errors (non-2xx or socket errors): see the log above.")
EOF
