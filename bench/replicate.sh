#!/usr/bin/env bash
# Replication of a chain of layers between two stores over loopback
# (/v1/push through the OCI registry protocol, bench/cmd/replbench), next to
# `rsync -a` over ssh and `scp -r` of the same blob files, as MB/s; then a
# resync with nothing to do, as seconds for IMAGES images.
# Every copy ends with `sync`: the store's commits are durable too.
# Usage: bench/replicate.sh   SIZE_MB=1024 LAYERS=8 PAR=4 IMAGES=1000 bench/replicate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
SIZE_MB=${SIZE_MB:-4096}
LAYERS=${LAYERS:-16}
PAR=${PAR:-4}
IMAGES=${IMAGES:-1000}
DIR=${DIR:-$(mktemp -d "${TMPDIR:-/tmp}/repl-bench.XXXXXX")}
SSHD_PID=
cleanup() { [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
USER=${USER:-$(id -un)}

go build -o "$DIR/replbench" ./bench/cmd/replbench

start_sshd
SSH="ssh ${SSH_OPTS[*]}"

row() { printf '%-36s %10s %14s %9s\n' "$@"; }

echo "preparing $SIZE_MB MiB of incompressible layers ($LAYERS layers) in $DIR"
read -r NAME ID BYTES < <("$DIR/replbench" prepare -root "$DIR/a" -size-mb "$SIZE_MB" -layers "$LAYERS")
sync; cat "$DIR"/a/blobs/sha256/*/* >/dev/null   # every tool reads from the page cache

row "transfer" "MB/s" "bytes" "seconds"
t0=$(now); rsync -a -e "$SSH" "$DIR/a/blobs/" "$USER@127.0.0.1:$DIR/rsync/"; sync; t1=$(now)
RSYNC_T=$(sub "$t0" "$t1"); row "rsync -a over ssh (+sync)" "$(mbps "$BYTES" "$RSYNC_T")" "$BYTES" "$RSYNC_T"
rm -rf "$DIR/rsync"; sync
t0=$(now); scp -q -r -P "$PORT" -i "$DIR/client_ed25519" -o UserKnownHostsFile="$DIR/known_hosts" -o BatchMode=yes "$DIR/a/blobs" "$USER@127.0.0.1:$DIR/scp"; sync; t1=$(now)
SCP_T=$(sub "$t0" "$t1"); row "scp -r (+sync)" "$(mbps "$BYTES" "$SCP_T")" "$BYTES" "$SCP_T"
rm -rf "$DIR/scp"; sync

read -r PBYTES PUSH_T < <("$DIR/replbench" push -src "$DIR/a" -dst "$DIR/b" -name "$NAME" -id "$ID" -parallel "$PAR")
row "imagestore /v1/push (p=$PAR, fsync)" "$(mbps "$PBYTES" "$PUSH_T")" "$PBYTES" "$PUSH_T"

BEST=$(awk -v a="$RSYNC_T" -v b="$SCP_T" 'BEGIN { print (a < b) ? a : b }')
RATIO=$(awk -v best="$BEST" -v p="$PUSH_T" 'BEGIN { printf "%.2f", best / p }')
echo "push vs faster of rsync/scp: ${RATIO}x (target >= 0.9x)"

read -r N NOOP_T < <("$DIR/replbench" noop -images "$IMAGES")
echo "no-op resync of $N images: ${NOOP_T} s (target < 2 s)"
