# Shell helpers shared by bench/run.sh and bench/soak.sh (sourced, not run).

# wait_ready ADMIN_PORT PID LOG [INTERVAL_S]: polls http://127.0.0.1:ADMIN_PORT/ready
# every INTERVAL_S (default 0.01) until it answers 200, at most 1,000 times. Returns
# 0 once ready; if the process PID exits first or time runs out, prints LOG to
# standard error and returns 1.
wait_ready() {
  local port="$1" pid="$2" log="$3" interval="${4:-0.01}"
  for _ in $(seq 1 1000); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$port/ready" 2>/dev/null; then
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep "$interval"
  done
  echo "meshca did not become ready; its log:" >&2
  cat "$log" >&2
  return 1
}
