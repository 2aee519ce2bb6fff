#!/usr/bin/env bash
# Full and incremental pulls of a qcow2 volume over loopback SFTP by the
# agent (pullfromhost, in-process via bench/cmd/pullbench), next to scp of
# the same file and rsync of the changed file, as MB/s, bytes moved and CPU
# seconds (client + sshd session).
# Usage: bench/pull.sh   (4 GiB)   SIZE_MB=1024 bench/pull.sh   PAR=4 (streams)
#        REPEAT=3 (full scp/pull pairs)   FULL_ONLY=1 (skip the incremental rows)
#        ZERO=1 (one allocated all-zero MiB: the pull's non-speculative path)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
SIZE_MB=${SIZE_MB:-4096}
PAR=${PAR:-4}
PROFILE=${PROFILE:-}   # a path: CPU profile of the full pull (go tool pprof)
DIR=${DIR:-$(mktemp -d "${TMPDIR:-/tmp}/pull-bench.XXXXXX")}
SSHD_PID=
cleanup() { [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
HZ=$(getconf CLK_TCK)
USER=${USER:-$(id -un)}

go build -o "$DIR/pullbench" ./bench/cmd/pullbench

start_sshd

# CPU seconds of reaped sshd sessions (the listener's cutime + cstime).
sshd_cpu() { awk -v hz="$HZ" '{ print ($16 + $17) / hz }' "/proc/$SSHD_PID/stat"; }
# timed CMD...: sets T (seconds) and C (client CPU seconds).
timed() {
  local out; out=$( { TIMEFORMAT='%R %U %S'; time "$@" >/dev/null; } 2>&1 | tail -1)
  T=$(awk '{ print $1 }' <<<"$out"); C=$(awk '{ print $2 + $3 }' <<<"$out")
}

# --- the volume: SIZE_MB of incompressible data, fully allocated qcow2.
echo "creating a $SIZE_MB MiB qcow2 volume in $DIR"
{ openssl enc -aes-128-ctr -pass pass:imagestore -nosalt -pbkdf2 </dev/zero 2>/dev/null || true; } | head -c $((SIZE_MB << 20)) > "$DIR/vol.raw"
if [ -n "${ZERO:-}" ]; then
  dd if=/dev/zero of="$DIR/vol.raw" bs=1M seek=$((SIZE_MB / 2)) count=1 conv=notrunc status=none
  qemu-img convert -S 0 -f raw -O qcow2 "$DIR/vol.raw" "$DIR/vol.qcow2"
else
  qemu-img convert -f raw -O qcow2 "$DIR/vol.raw" "$DIR/vol.qcow2"
fi
rm -f "$DIR/vol.raw"
VOL=$DIR/vol.qcow2
VOL_BYTES=$(stat -c %s "$VOL")
mkdir -p "$DIR/dest"
sync; cat "$VOL" >/dev/null   # host side reads come from the page cache for every tool

row() { printf '%-34s %10s %14s %9s %8s %14s\n' "$@"; }
row "transfer" "MB/s" "bytes moved" "seconds" "CPU-s" "client+sshd"

# Full transfers, REPEAT times (default 3), scp and the agent's pull taking
# turns, each into a fresh destination: how fast a new file fills depends
# on the machine's memory state (on a VM, pages never touched before cost
# a host fault), so alternating gives both tools the same conditions, and
# the ratio is of the medians.
SCP_TS=(); PULL_TS=()
REPEAT=${REPEAT:-3}
[ "$REPEAT" -ge 1 ] || { echo "REPEAT must be at least 1" >&2; exit 2; }
for _ in $(seq "$REPEAT"); do
# scp of the whole file (+ sync: the store's commit is durable too).
rm -f "$DIR/dest/vol.qcow2"
s0=$(sshd_cpu); t0=$(now)
timed scp -q -o Ciphers=aes128-gcm@openssh.com -P "$PORT" -i "$DIR/client_ed25519" -o UserKnownHostsFile="$DIR/known_hosts" -o BatchMode=yes "$USER@127.0.0.1:$VOL" "$DIR/dest/vol.qcow2"
sync; t1=$(now); sleep 0.2; s1=$(sshd_cpu)
SCP_T=$(sub "$t0" "$t1"); SCP_SSHD=$(sub "$s0" "$s1"); SCP_CPU=$(awk -v a="$C" -v b="$SCP_SSHD" 'BEGIN { print a + b }')
SCP_TS+=("$SCP_T")
row "scp full (+sync)" "$(mbps "$VOL_BYTES" "$SCP_T")" "$VOL_BYTES" "$SCP_T" "$SCP_CPU" "$C+$SCP_SSHD"

# agent full pull, into a fresh store.
rm -rf "$DIR/store"
s0=$(sshd_cpu)
read -r BASE_IP PULL_BYTES PULL_T PULL_CPU < <("$DIR/pullbench" -root "$DIR/store" -known-hosts "$DIR/known_hosts" -key "$DIR/client_ed25519" -port "$PORT" -user "$USER" -path "$VOL" -parallelism "$PAR" ${PROFILE:+-cpuprofile "$PROFILE"})
sleep 0.2; s1=$(sshd_cpu)
PULL_SSHD=$(sub "$s0" "$s1"); PULL_CLIENT=$PULL_CPU
PULL_CPU=$(awk -v a="$PULL_CPU" -v b="$PULL_SSHD" 'BEGIN { print a + b }')
PULL_TS+=("$PULL_T")
row "agent pullfromhost full (p=$PAR)" "$(mbps "$VOL_BYTES" "$PULL_T")" "$PULL_BYTES" "$PULL_T" "$PULL_CPU" "$PULL_CLIENT+$PULL_SSHD"
done
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
SCP_T=$(median "${SCP_TS[@]}"); PULL_T=$(median "${PULL_TS[@]}")
echo "median of ${#SCP_TS[@]}: scp $(mbps "$VOL_BYTES" "$SCP_T") MB/s, pull $(mbps "$VOL_BYTES" "$PULL_T") MB/s"
awk -v p="$PULL_T" -v s="$SCP_T" 'BEGIN {
  printf "full pull throughput / scp (medians): %.2f (target >= 0.9): %s\n", s / p, (s / p >= 0.9) ? "OK" : "MISSED" }'
[ -n "${FULL_ONLY:-}" ] && exit 0

# --- 1% change: the same random 1 MiB writes into a delta (for the agent)
# and into a copy of the volume (for rsync against the scp'd copy).
NCHG=$(( SIZE_MB / 100 > 0 ? SIZE_MB / 100 : 1 ))
qemu-img create -q -f qcow2 -b "$VOL" -F qcow2 "$DIR/delta.qcow2"
cp --reflink=auto "$VOL" "$DIR/vol2.qcow2"
CMDS=()
for i in $(seq "$NCHG"); do
  off=$(( (RANDOM * 32768 + RANDOM) % SIZE_MB ))
  CMDS+=(-c "write -P $(( i % 250 + 1 )) ${off}M 1M")
done
qemu-io -f qcow2 "${CMDS[@]}" "$DIR/delta.qcow2" >/dev/null
qemu-io -f qcow2 "${CMDS[@]}" "$DIR/vol2.qcow2" >/dev/null
CHANGED=$(qemu-img map --output=json "$DIR/delta.qcow2" | python3 -c '
import json, sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["depth"] == 0 and e["data"]))')
sync; cat "$DIR/delta.qcow2" "$DIR/vol2.qcow2" >/dev/null

s0=$(sshd_cpu)
read -r _ INC_BYTES INC_T INC_CPU < <("$DIR/pullbench" -root "$DIR/store" -known-hosts "$DIR/known_hosts" -key "$DIR/client_ed25519" -port "$PORT" -user "$USER" -path "$DIR/delta.qcow2" -parent "$BASE_IP" -parallelism "$PAR")
sleep 0.2; s1=$(sshd_cpu)
INC_CPU=$(awk -v a="$INC_CPU" -v b="$(sub "$s0" "$s1")" 'BEGIN { print a + b }')
row "agent pullfromhost 1% delta" "$(mbps "$CHANGED" "$INC_T")" "$INC_BYTES" "$INC_T" "$INC_CPU"

s0=$(sshd_cpu); t0=$(now)
RS=$( { TIMEFORMAT='%R %U %S'; time rsync --inplace --no-whole-file --stats -e "ssh ${SSH_OPTS[*]} -o Ciphers=aes128-gcm@openssh.com" "$USER@127.0.0.1:$DIR/vol2.qcow2" "$DIR/dest/vol.qcow2"; } 2>&1)
sync; t1=$(now); sleep 0.2; s1=$(sshd_cpu)
RS_BYTES=$(awk -F': ' '/Total bytes received/ { gsub(/,/, "", $2); print $2 + 0 }' <<<"$RS")
RS_T=$(sub "$t0" "$t1")
RS_CPU=$(awk -v a="$(tail -1 <<<"$RS" | awk '{ print $2 + $3 }')" -v b="$(sub "$s0" "$s1")" 'BEGIN { print a + b }')
row "rsync of the changed file" "$(mbps "$CHANGED" "$RS_T")" "$RS_BYTES" "$RS_T" "$RS_CPU"

echo "volume $VOL_BYTES bytes; changed (delta data) $CHANGED bytes"
awk -v ib="$INC_BYTES" -v c="$CHANGED" 'BEGIN {
  printf "incremental bytes moved / changed: %.3f (target <= 1.05): %s\n", ib / c, (ib / c <= 1.05) ? "OK" : "MISSED"
}'
