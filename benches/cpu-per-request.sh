#!/usr/bin/env bash
# CPU time one process spends per request while wrk drives a URL: user and system microseconds,
# read from /proc/PID/stat around a `wrk -t1 -c50` run on CPU 1 (BENCHMARKING.md's pinning).
# Used to split a proxy's cost into user space and kernel (BENCHMARKS.md, "Where the time goes").
#   benches/cpu-per-request.sh PID URL [HOST-HEADER] [SECONDS]
set -euo pipefail
pid=$1 url=$2 host=${3:-} secs=${4:-5}
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
if [ -n "$host" ]; then
  out=$(taskset -c 1 wrk -t1 -c50 -d"${secs}s" -H "Host: $host" "$url")
else
  out=$(taskset -c 1 wrk -t1 -c50 -d"${secs}s" "$url")
fi
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
n=$(awk '/requests in/{print $1}' <<<"$out")
rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
errors=$(awk '/Non-2xx/{print $NF}' <<<"$out")
tck=$(getconf CLK_TCK)
awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v n="$n" -v t="$tck" -v rps="$rps" -v e="${errors:-0}" \
  'BEGIN { printf "req/s %s  non-2xx %s  user %.2f us/req  sys %.2f us/req\n", rps, e, u * 1e6 / t / n, s * 1e6 / t / n }'
