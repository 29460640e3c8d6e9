#!/usr/bin/env bash
# Soak test: a long run at half of the measured capacity, with issuer rotation and
# drifting agents; fails on any failed request or renewal, or on memory growth.
#
#   bench/soak.sh [DURATION]        DURATION: 30m (default), 90s, 1h, or seconds
#
# What it does:
# - builds the release binaries (MESHCA_SOAK_PROFILE=dev: uses target/debug as
#   `cargo test` left it, no release build);
# - makes a CA (`meshca init`) whose issuer directory is laid out as the kubelet
#   mounts a Secret (files are symlinks through `..data`), starts
#   `meshca serve --dev` on it with a 5-minute issuance lifetime;
# - measures capacity for 5 s (closed loop, 64 streams: `meshca-load`), unless
#   MESHCA_SOAK_RATE gives the rate; then drives half of it, paced
#   (`meshca-load --rate`), for DURATION, counting every call (no warm-up);
# - meanwhile: rotates the issuer every DURATION/6 (every 5 minutes for 30m) to a
#   new one under the same anchor (openssl; swapped in one rename, as the
#   kubelet does), picked up by the reloader, and renames the audit log away at
#   the same moments (logrotate without copytruncate: meshca follows with a new
#   file that names the old one's last record); runs 3 `meshca agent`s renewing
#   every ~DURATION/12 (at least every 6 s), with their wall clocks drifted by
#   libfaketime when installed (+40 s, -40 s, and running 1% fast; without
#   faketime the agents run undrifted and the report says so); samples the
#   server's RSS every DURATION/60 (1 to 5 s);
# - then stops everything, verifies the audit log, and fails unless: no request
#   failed, no agent round failed and each renewed at least twice, every rotation
#   was loaded, every audit file is intact without gaps, proven by a signed
#   checkpoint, and continues the one before, and the server's mean RSS in the
#   last quarter is at most 20% above that of the first quarter.
#
# Disk: every call is an audit record of about 1 KB, so the data directory
# (under TMPDIR) needs about rate x duration KB, e.g. 4 GB for 30m at 2,500/s;
# checked before the load starts.
#
# Environment: MESHCA_SOAK_RATE (calls/s; skips the capacity measurement),
# MESHCA_SOAK_PORT (gRPC, default 18180; admin +1000, agents' admin +1001..+1003),
# MESHCA_SOAK_PROFILE (release | dev), MESHCA_SOAK_KEEP=1 keeps the data directory.
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
ARG="${1:-30m}"
case "$ARG" in
  *[!0-9smh]* | '' | [smh]*) echo "usage: bench/soak.sh [DURATION: 30m, 90s, 1h or seconds]" >&2; exit 2 ;;
  *h) DURATION=$((${ARG%h} * 3600)) ;;
  *m) DURATION=$((${ARG%m} * 60)) ;;
  *s) DURATION="${ARG%s}" ;;
  *) DURATION="$ARG" ;;
esac
if [ "$DURATION" -lt 30 ]; then
  echo "bench/soak.sh: DURATION must be at least 30s" >&2
  exit 2
fi
PORT="${MESHCA_SOAK_PORT:-18180}"
ADMIN_PORT=$((PORT + 1000))
for tool in curl openssl awk; do
  command -v "$tool" >/dev/null || { echo "bench/soak.sh needs $tool" >&2; exit 2; }
done

DATA="$(mktemp -d "${TMPDIR:-/tmp}/meshca-soak.XXXXXX")"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "${MESHCA_SOAK_KEEP:-0}" = 1 ]; then
    echo "data directory kept: $DATA" >&2
  else
    rm -rf "$DATA"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "== [$(date -u +%T)] $*" >&2; }
field() { sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" <<<"$1"; }
# The value of an unlabelled sample in Prometheus text.
metric() { awk -v n="$2" '$1 == n { print $2; exit }' <<<"$1"; }
fail() { echo "SOAK FAILED: $*" >&2; FAILED=1; }
FAILED=0

if [ "${MESHCA_SOAK_PROFILE:-release}" = dev ]; then
  log "using the debug binaries (MESHCA_SOAK_PROFILE=dev)"
  cargo build --locked --workspace --bins >&2
  BIN=target/debug
else
  log "building release binaries"
  cargo build --release --locked --workspace --bins >&2
  BIN=target/release
fi
MESHCA="$BIN/meshca"
LOAD="$BIN/meshca-load"

# --- The CA, its issuer mounted like a Kubernetes Secret -------------------
"$MESHCA" init --dir "$DATA/ca" >/dev/null
cp "$DATA/ca/trust-anchors.pem" "$DATA/ca/trust-anchor.key" "$DATA/"
MOUNT="$DATA/issuer-mount"
mkdir -p "$MOUNT/..gen0"
cp "$DATA/ca/issuer/tls.crt" "$DATA/ca/issuer/tls.key" "$MOUNT/..gen0/"
ln -s ..gen0 "$MOUNT/..data"
ln -s ..data/tls.crt "$MOUNT/tls.crt"
ln -s ..data/tls.key "$MOUNT/tls.key"

# A new issuer under the same anchor, swapped in with one rename. Valid from an
# hour ago, as `meshca init` makes them: meshca clamps certificates to their
# issuer's notBefore, and an issuer valid only from now would be "not yet valid"
# to a client whose clock is behind (the -40 s agent).
rotate_issuer() {
  local gen="$1" dir="$MOUNT/..gen$1" work="$DATA/rotation-$1"
  mkdir "$dir" "$work"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/tls.key" 2>/dev/null
  openssl req -new -key "$dir/tls.key" -subj "/CN=identity.meshca-system.cluster.local" -out "$work/req.csr"
  : >"$work/index.txt"
  openssl rand -hex 16 >"$work/serial"
  cat >"$work/ca.cnf" <<CNF
[ca]
default_ca = rotation
[rotation]
database = $work/index.txt
new_certs_dir = $work
serial = $work/serial
default_md = sha256
policy = any
unique_subject = no
[any]
commonName = supplied
[issuer]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
  openssl ca -batch -notext -config "$work/ca.cnf" -extensions issuer -in "$work/req.csr" -out "$dir/tls.crt" \
    -cert "$DATA/trust-anchors.pem" -keyfile "$DATA/trust-anchor.key" \
    -startdate "$(date -u -d '1 hour ago' +%Y%m%d%H%M%SZ)" -enddate "$(date -u -d '30 days' +%Y%m%d%H%M%SZ)" \
    2>"$work/openssl.log" || { cat "$work/openssl.log" >&2; return 1; }
  ln -s "..gen$gen" "$MOUNT/..data_tmp"
  mv -T "$MOUNT/..data_tmp" "$MOUNT/..data"
}

# --- The server -------------------------------------------------------------
if curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN_PORT/live" 2>/dev/null; then
  echo "something already answers on 127.0.0.1:$ADMIN_PORT; set MESHCA_SOAK_PORT" >&2
  exit 1
fi
log "starting meshca serve --dev in $DATA"
"$MESHCA" serve --dev --data-dir "$DATA" --issuer-dir "$MOUNT" --issuance-lifetime 5m \
  --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" 2>"$DATA/server.log" &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
wait_ready "$ADMIN_PORT" "$SERVER_PID" "$DATA/server.log" || exit 1

# --- Rate -------------------------------------------------------------------
if [ -n "${MESHCA_SOAK_RATE:-}" ]; then
  RATE="$MESHCA_SOAK_RATE"
  CAPACITY="n/a (MESHCA_SOAK_RATE given)"
else
  log "measuring capacity: 5 s closed loop, 64 streams"
  OUT="$("$LOAD" --addr "https://127.0.0.1:$PORT" --data-dir "$DATA" --concurrency 64 --duration 5 \
    --warmup 1 --pool 2000 --json)"
  CAPACITY="$(awk -v r="$(field "$OUT" certs_per_s)" 'BEGIN { printf "%.0f", r }')"
  RATE="$(awk -v c="$CAPACITY" 'BEGIN { printf "%.0f", c / 2 }')"
fi
log "soak: $RATE calls/s for ${DURATION}s (capacity $CAPACITY/s)"
NEED_KB=$((RATE * DURATION + 100000))
FREE_KB="$(df -Pk "$DATA" | awk 'NR == 2 { print $4 }')"
if [ "$FREE_KB" -lt "$NEED_KB" ]; then
  echo "bench/soak.sh: the audit log needs about $((NEED_KB / 1024)) MiB, $((FREE_KB / 1024)) MiB free under $DATA;" \
    "set TMPDIR or a lower MESHCA_SOAK_RATE" >&2
  exit 1
fi

# --- Agents -----------------------------------------------------------------
INTERVAL=$((DURATION / 12))
RENEW_AT="$(awk -v i="$INTERVAL" 'BEGIN { r = i / 300; if (r < 0.02) r = 0.02; if (r > 0.5) r = 0.5; print r }')"
DRIFTS=("+40s" "-40s" "+0 x1.01")
FAKETIME_LIB=""
for lib in /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 /usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1 \
  /usr/lib/faketime/libfaketimeMT.so.1 /usr/local/lib/faketime/libfaketimeMT.so.1; do
  [ -e "$lib" ] && FAKETIME_LIB="$lib" && break
done
if [ -z "$FAKETIME_LIB" ]; then
  log "libfaketime not found (apt-get install faketime): agents run without clock drift"
fi
"$MESHCA" dev-token --data-dir "$DATA" --namespace soak --service-account agent --ttl "$((DURATION + 3600))s" \
  >"$DATA/agent.token"
for i in 0 1 2; do
  env=()
  if [ -n "$FAKETIME_LIB" ]; then
    env=(LD_PRELOAD="$FAKETIME_LIB" FAKETIME="${DRIFTS[$i]}" FAKETIME_DONT_FAKE_MONOTONIC=1)
  fi
  env "${env[@]}" "$MESHCA" agent --addr "https://127.0.0.1:$PORT" --trust-anchors "$DATA/trust-anchors.pem" \
    --token-file "$DATA/agent.token" --identity agent.soak.serviceaccount.identity.meshca-system.cluster.local \
    --out "$DATA/agent-$i" --renew-at "$RENEW_AT" --admin-listen "127.0.0.1:$((ADMIN_PORT + 1 + i))" \
    2>"$DATA/agent-$i.log" &
  PIDS+=("$!")
done

# --- Load, rotation, RSS samples ---------------------------------------------
"$LOAD" --addr "https://127.0.0.1:$PORT" --data-dir "$DATA" --concurrency 64 --rate "$RATE" \
  --duration "$DURATION" --warmup 0 --pool 5000 --server-pid "$SERVER_PID" --json >"$DATA/load.json" \
  2>"$DATA/load.log" &
LOAD_PID=$!
PIDS+=("$LOAD_PID")
START="$(date +%s)"
SAMPLE=$((DURATION / 60))
[ "$SAMPLE" -lt 1 ] && SAMPLE=1
[ "$SAMPLE" -gt 5 ] && SAMPLE=5
rotations=0
next_rotation=$((DURATION / 6))
: >"$DATA/rss.txt"
while kill -0 "$LOAD_PID" 2>/dev/null; do
  elapsed=$(($(date +%s) - START))
  awk -v t="$elapsed" '/^VmRSS:/ { print t, $2 }' "/proc/$SERVER_PID/status" >>"$DATA/rss.txt"
  if [ "$rotations" -lt 5 ] && [ "$elapsed" -ge "$next_rotation" ]; then
    rotations=$((rotations + 1))
    log "rotating the issuer and the audit log ($rotations of 5)"
    rotate_issuer "$rotations"
    mv "$DATA/audit.jsonl" "$DATA/audit.jsonl.$rotations"
    next_rotation=$((next_rotation + DURATION / 6))
  fi
  sleep "$SAMPLE"
done
load_status=0
wait "$LOAD_PID" || load_status=$?
LOAD_OUT="$(cat "$DATA/load.json")"
[ "$load_status" = 0 ] || fail "meshca-load exited with $load_status: $(cat "$DATA/load.log")"

# --- Verdict ------------------------------------------------------------------
SERVER_METRICS="$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics")"
RELOADS="$(metric "$SERVER_METRICS" meshca_reloads_total)"
RELOAD_FAILURES="$(metric "$SERVER_METRICS" meshca_reload_failures_total)"
AGENTS=""
for i in 0 1 2; do
  m="$(curl -fsS "http://127.0.0.1:$((ADMIN_PORT + 1 + i))/metrics" || true)"
  renewals="$(metric "$m" meshca_agent_renewals_total)"
  failures="$(metric "$m" meshca_agent_failures_total)"
  offset="$(metric "$m" meshca_agent_clock_offset_seconds)"
  drift="none"
  [ -n "$FAKETIME_LIB" ] && drift="${DRIFTS[$i]}"
  AGENTS+="agent $i (drift $drift, measured offset ${offset:-?} s): ${renewals:-?} renewals, ${failures:-?} failed rounds"$'\n'
  [ "${failures:-x}" = 0 ] || fail "agent $i: ${failures:-unknown} failed rounds (log: $(tail -3 "$DATA/agent-$i.log"))"
  [ "${renewals:-0}" -ge 2 ] 2>/dev/null || fail "agent $i renewed ${renewals:-0} times (at least 2 expected)"
done
ERRORS="$(field "$LOAD_OUT" errors)"
CERTS="$(field "$LOAD_OUT" certs)"
[ "$ERRORS" = 0 ] || fail "$ERRORS requests failed: $(sed -n 's/.*"errors_by_code":\({[^}]*}\).*/\1/p' <<<"$LOAD_OUT")"
[ "${RELOADS:-0}" = "$rotations" ] || fail "$rotations rotations, ${RELOADS:-0} reloads"
[ "$rotations" = 5 ] || fail "only $rotations rotations happened"

log "stopping agents and meshca"
for pid in "${PIDS[@]:1}"; do
  kill -TERM "$pid" 2>/dev/null || true
done
status=0
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || status=$?
[ "$status" = 0 ] || fail "meshca exited with $status: $(tail -5 "$DATA/server.log")"
# Every file verifies on its own against a signed checkpoint (a rotated file's final
# checkpoint is in the next file's first record; the last file has its own, written
# at the clean stop), records no gap, leaves nothing uncovered, and continues the one
# before it.
AUDIT=""
previous=""
files=("$DATA"/audit.jsonl.{1..5} "$DATA/audit.jsonl")
for i in "${!files[@]}"; do
  file="${files[$i]}"
  args=(audit verify "$file" --key "$DATA/audit.pub")
  next="${files[$((i + 1))]:-}"
  if [ -n "$next" ]; then
    python3 -c 'import json, sys; sys.stdout.write(json.loads(open(sys.argv[1]).readline())["previous_checkpoint"])' \
      "$next" >"$file.checkpoint-saved" || fail "$(basename "$next") holds no checkpoint of $(basename "$file")"
    args+=(--checkpoint "$file.checkpoint-saved")
  fi
  out="$("$MESHCA" "${args[@]}" 2>&1)" || fail "audit log: $out"
  grep -q "gap" <<<"$out" && fail "the audit log records a gap: $out"
  grep -q "not yet covered" <<<"$out" && fail "records no checkpoint covers: $out"
  if [ -n "$previous" ]; then
    last="$(tail -n 1 "$previous" | sed -n 's/.*"hash":"\([0-9a-f]*\)"}$/\1/p')"
    grep -q "continues a previous log (renamed) that ends at seq [0-9]*, hash $last" <<<"$out" ||
      fail "$(basename "$file") does not continue $(basename "$previous"): $out"
  fi
  previous="$file"
  AUDIT+="${out//"$DATA"\//}"$'\n'
done

# Mean RSS (MiB) of the first and the last quarter of the samples.
read -r RSS_FIRST RSS_LAST SAMPLES <<<"$(awk '{ t[NR] = $2 } END {
  q = int(NR / 4); if (q < 1) q = 1
  for (i = 1; i <= q; i++) { a += t[i]; b += t[NR - q + i] }
  printf "%.1f %.1f %d", a / q / 1024, b / q / 1024, NR }' "$DATA/rss.txt")"
GROWTH="$(awk -v a="$RSS_FIRST" -v b="$RSS_LAST" 'BEGIN { printf "%.1f", 100 * (b - a) / a }')"
awk -v g="$GROWTH" 'BEGIN { exit !(g > 20) }' && fail "RSS grew ${GROWTH}% (first quarter ${RSS_FIRST} MiB, last ${RSS_LAST} MiB)"

cat <<EOF

meshca soak: ${DURATION}s at $RATE calls/s (capacity ${CAPACITY}/s), $(nproc) cores shared by client, agents and server
requests: $CERTS certificates, $ERRORS failed; p50 $(field "$LOAD_OUT" p50_ms) ms, p99 $(field "$LOAD_OUT" p99_ms) ms, max $(field "$LOAD_OUT" max_ms) ms
issuer rotations: $rotations, reloads: ${RELOADS:-?}, reload failures: ${RELOAD_FAILURES:-?}
${AGENTS}server RSS: first quarter ${RSS_FIRST} MiB, last quarter ${RSS_LAST} MiB (${GROWTH}%), $SAMPLES samples every ${SAMPLE}s
audit log, rotated with the issuer:
$AUDIT
EOF
if [ "$FAILED" != 0 ]; then
  echo "SOAK FAILED (server log: $DATA/server.log; set MESHCA_SOAK_KEEP=1 to keep it)" >&2
  exit 1
fi
echo "SOAK PASSED"
