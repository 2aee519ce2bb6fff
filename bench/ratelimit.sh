#!/bin/sh
# Rate accuracy of transfer/ratelimit on loopback TCP: 1, 4 and 16 streams
# sharing one limiter at 5, 20 and 80 MiB/s. For each run it prints the mean
# rate over WINDOW (default 10s) and the largest 250 ms window relative to the
# limit. Targets: within ±3%, and ≤ 1.25×. Exit status 1 if a target is missed.
#   WINDOW=2s bench/ratelimit.sh          # quicker
#   MODE=write bench/ratelimit.sh         # limit the sending side instead
#   NICE=-10 bench/ratelimit.sh           # (root) keep a busy machine from starving it
# The limiter cannot make up for time the process is not scheduled (its bucket
# holds only 25 ms), so on a machine loaded far beyond its cores the figures
# measure the scheduler; the load average is printed for that reason.
set -eu
cd "$(dirname "$0")/.."
. bench/lib.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
go build -o "$tmp/ratebench" ./bench/cmd/ratebench
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), cores: $(nproc)"
set -- "$tmp/ratebench" \
	-window "${WINDOW:-10s}" \
	-streams "${STREAMS:-1,4,16}" \
	-limits "${LIMITS:-5,20,80}" \
	-mode "${MODE:-read}"
if [ -n "${NICE:-}" ]; then
	set -- nice -n "$NICE" "$@"
fi
"$@"
