#!/usr/bin/env bash
# The agent with its store on Ceph RGW (S3), beside the S3 client alone, in
# one run: ingest of a 1 GiB layer (CLI push to the agent, which stores it
# in the bucket) and its restore (CLI pull -format raw, which the agent
# reads back from the bucket), next to the same file uploaded and
# downloaded by bench/cmd/s3bench with the backend's own client
# configuration (aws-sdk-go-v2, 16 MiB parts one after the other). Prints
# MB/s, the ratio to the client alone (target >= 0.8) and the agent's
# peak RSS.
#
# A single-node Ceph (mon, mgr, one memstore OSD, radosgw) comes up on free
# loopback ports under $DIR through the tests' harness (blobstore/s3/rgwtest);
# .ci/deps installs ceph-mon ceph-osd ceph-mgr radosgw.
#
# The restore is measured RESTORES times (default 3), client and agent
# alternating, and the table gives the medians: RGW's own rate on this
# shared 2-core machine swings by 1.5x between runs a minute apart, so one
# pair can land on either side of the target by chance.
#
# Usage: bench/s3.sh                # 1 GiB of random data
#        SIZE_MB=256 bench/s3.sh    # a quicker look
#        RESTORES=5 bench/s3.sh     # more restore pairs
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
SIZE_MB=${SIZE_MB:-1024}
RESTORES=${RESTORES:-3}
# Short: Ceph's admin sockets live under it (107-byte unix socket paths).
DIR=${DIR:-$(mktemp -d /tmp/s3b.XXXXXX)}
AGENT_PID= RGW_PID=
cleanup() {
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null
  if [ -n "$RGW_PID" ]; then kill "$RGW_PID" 2>/dev/null; wait "$RGW_PID" 2>/dev/null || true; fi
  rm -rf "$DIR"
}
trap cleanup EXIT

go build -o "$DIR/s3bench" ./bench/cmd/s3bench
go build -o "$DIR/imagestore" ./cmd/imagestore
go build -o "$DIR/imagestore-agent" ./cmd/imagestore-agent

# timed NAME CMD...: runs CMD, sets T_NAME (seconds), M_NAME (peak RSS,
# MiB), C_NAME (its CPU seconds) and A_NAME (the agent's CPU seconds meanwhile).
timed() {
  local name=$1; shift
  local a0; a0=$(agent_cpu)
  /usr/bin/time -f '%e %M %U %S' -o "$DIR/time.out" "$@" >/dev/null
  read -r t m u s < "$DIR/time.out"
  printf -v "T_$name" '%s' "$t"; printf -v "M_$name" '%s' "$((m / 1024))"
  printf -v "C_$name" '%s' "$(awk -v u="$u" -v s="$s" 'BEGIN { printf "%.1f", u + s }')"
  printf -v "A_$name" '%s' "$(awk -v a="$a0" -v b="$(agent_cpu)" 'BEGIN { printf "%.1f", b - a }')"
}
# agent_cpu: the agent's user+system CPU seconds so far.
agent_cpu() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$AGENT_PID/stat"
}
# client NAME ARGS...: runs s3bench, sets T_NAME (its own timing) and C_NAME (CPU s).
client() {
  local name=$1; shift
  /usr/bin/time -f '%U %S' -o "$DIR/ctime.out" "$DIR/s3bench" "$@" > "$DIR/client.out"
  read -r _ t < "$DIR/client.out"
  read -r u s < "$DIR/ctime.out"
  printf -v "T_$name" '%s' "$t"
  printf -v "C_$name" '%s' "$(awk -v u="$u" -v s="$s" 'BEGIN { printf "%.1f", u + s }')"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
mb() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1e6 }'; }

echo "RGW: starting under $DIR"
t0=$(now)
"$DIR/s3bench" up -dir "$DIR" 2>"$DIR/rgw.log" &
RGW_PID=$!
for _ in $(seq 900); do
  [ -f "$DIR/s3.env" ] && break
  kill -0 "$RGW_PID" 2>/dev/null || { echo "RGW did not start:" >&2; cat "$DIR/rgw.log" >&2; exit 1; }
  sleep 1
done
[ -f "$DIR/s3.env" ] || { echo "RGW did not start in 15 min" >&2; exit 1; }
echo "RGW: up in $(sub "$t0" "$(now)") s"
# shellcheck disable=SC1091
. "$DIR/s3.env"

echo "layer: $SIZE_MB MiB of random data"
head -c "$((SIZE_MB << 20))" /dev/urandom > "$DIR/vol.raw"
qemu-img convert -f raw -O qcow2 "$DIR/vol.raw" "$DIR/vol.qcow2"
BYTES=$(stat -c %s "$DIR/vol.qcow2")
sync; cat "$DIR/vol.raw" "$DIR/vol.qcow2" >/dev/null

cat > "$DIR/agent.yaml" <<CFG
profile: imagestore
root: $DIR/store
listen: 127.0.0.1:0
registryListen: 127.0.0.1:0
logFormat: json
logLevel: info
verifyInterval: 0s
storage:
  type: s3
  endpoint: $ENDPOINT
  bucket: $BUCKET
  prefix: agent
  region: $REGION
  pathStyle: true
CFG
IMAGESTORE_S3_ACCESS_KEY=$AK IMAGESTORE_S3_SECRET_KEY=$SK "$DIR/imagestore-agent" -config "$DIR/agent.yaml" 2>"$DIR/agent.log" &
AGENT_PID=$!
url=
for _ in $(seq 300); do
  url=$(sed -n 's/.*"msg":"registry listening".*"addr":"\([^"]*\)".*/\1/p' "$DIR/agent.log")
  [ -n "$url" ] && break
  kill -0 "$AGENT_PID" 2>/dev/null || break
  sleep 0.1
done
[ -n "$url" ] || { echo "agent did not start: $(cat "$DIR/agent.log")" >&2; exit 1; }
cli=("$DIR/imagestore" -url "http://$url" -quiet)

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
# Interleaved, so both see the same machine: client put, agent push,
# client get, agent pull.
client cput put -env "$DIR/s3.env" -file "$DIR/vol.qcow2" -key client-alone
timed push "${cli[@]}" push -name vol -id base "$DIR/vol.qcow2"
PAIRS=()
for i in $(seq "$RESTORES"); do
  client "cget$i" get -env "$DIR/s3.env" -key client-alone -o "$DIR/got.qcow2"
  cmp "$DIR/got.qcow2" "$DIR/vol.qcow2" || { echo "the client's download differs" >&2; exit 1; }
  rm -f "$DIR/got.qcow2"
  timed "pull$i" "${cli[@]}" pull -format raw -installpath "$DIR/pulled.raw" vol:base
  cmp "$DIR/pulled.raw" "$DIR/vol.raw" || { echo "the pulled layer differs from the volume" >&2; exit 1; }
  rm -f "$DIR/pulled.raw"
  t_c=T_cget$i t_p=T_pull$i c_c=C_cget$i c_p=C_pull$i a_p=A_pull$i m_p=M_pull$i
  PAIRS+=("${!t_c} ${!t_p} ${!c_c} ${!c_p} ${!a_p} ${!m_p}")
done
# median COLUMN: the median of that column of PAIRS (the lower middle one
# for an even count).
median() { printf '%s\n' "${PAIRS[@]}" | awk -v k="$1" '{ print $k }' | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
T_cget=$(median 1) T_pull=$(median 2) C_cget=$(median 3) C_pull=$(median 4) A_pull=$(median 5)
M_pull=$(printf '%s\n' "${PAIRS[@]}" | awk '$6 > m { m = $6 } END { print m }')
AGENT_RSS=$(( $(awk '/VmHWM/ { print $2 }' "/proc/$AGENT_PID/status") / 1024 ))
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"

echo
echo "layer ${SIZE_MB} MiB random; rates over the qcow2's $(mb "$BYTES") MB; RGW 1 node (memstore) on loopback"
echo
echo "| step | agent on RGW | S3 client alone | ratio (target >= 0.8) |"
echo "|---|---|---|---|"
echo "| ingest | CLI push: **$(mbps "$BYTES" "$T_push") MB/s** | multipart upload: $(mbps "$BYTES" "$T_cput") MB/s | $(ratio "$T_cput" "$T_push")× |"
echo "| restore (median of $RESTORES) | CLI pull -format raw: **$(mbps "$BYTES" "$T_pull") MB/s** | GET to a file + fsync: $(mbps "$BYTES" "$T_cget") MB/s | $(ratio "$T_cget" "$T_pull")× |"
echo "| peak RSS (MiB) | agent $AGENT_RSS, CLI push $M_push / pull $M_pull | | |"
echo "| CPU s (RGW's not counted) | push: agent $A_push + CLI $C_push; pull: agent $A_pull + CLI $C_pull | put $C_cput; get $C_cget | |"
echo
echo "restore pairs, in the order run (client GET, then agent pull):"
echo
echo "| pair | client MB/s | ours MB/s | ratio | CPU s: client / agent + CLI |"
echo "|---|---|---|---|---|"
for i in "${!PAIRS[@]}"; do
  read -r tc tp cc cp ap _ <<< "${PAIRS[$i]}"
  echo "| $((i + 1)) | $(mbps "$BYTES" "$tc") | $(mbps "$BYTES" "$tp") | $(ratio "$tc" "$tp")× | $cc / $ap + $cp |"
done
