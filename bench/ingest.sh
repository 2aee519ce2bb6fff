#!/usr/bin/env bash
# Compares blobstore ingest with the two physical limits it combines:
# writing the bytes durably (cat > DEST && sync) and hashing them (sha256sum).
# Usage: bench/ingest.sh            (2 GiB)   SIZE_MB=512 bench/ingest.sh
# DIR=/path picks the filesystem to test (default: a temp dir under ./bench).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
SIZE_MB=${SIZE_MB:-2048}
DIR=${DIR:-$(mktemp -d "${TMPDIR:-/tmp}/ingest-bench.XXXXXX")}
trap 'rm -rf "$DIR"' EXIT
SRC=$DIR/src.bin

go build -o "$DIR/ingest" ./bench/cmd/ingest
echo "creating $SIZE_MB MiB test file in $DIR"
head -c $((SIZE_MB * 1024 * 1024)) /dev/urandom > "$SRC"
sync
BYTES=$(stat -c %s "$SRC")


# Source stays in the page cache for all three runs (it was just written),
# so each measures its own limit, not the read of SRC.
cat "$SRC" > /dev/null

t0=$(now); cat "$SRC" > "$DIR/dest.bin" && sync; t1=$(now)
CAT_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
rm -f "$DIR/dest.bin"; sync

t0=$(now); sha256sum "$SRC" > /dev/null; t1=$(now)
SHA_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')

t0=$(now); OUT=$("$DIR/ingest" -root "$DIR/store" -file "$SRC"); t1=$(now)
ING_S=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')

CAT=$(mbps "$BYTES" "$CAT_S"); SHA=$(mbps "$BYTES" "$SHA_S"); ING=$(mbps "$BYTES" "$ING_S")
SLOWER=$(awk -v a="$CAT" -v b="$SHA" 'BEGIN { print (a < b) ? a : b }')
printf '%-26s %10s MB/s\n' "cat > DEST && sync" "$CAT" "sha256sum" "$SHA" "blobstore ingest" "$ING"
echo "ingest detail: $OUT"
awk -v i="$ING" -v c="$CAT" -v s="$SHA" -v m="$SLOWER" 'BEGIN {
  printf "ratio ingest/cat+sync  %.2f\n", i / c
  printf "ratio ingest/sha256sum %.2f\n", i / s
  printf "ratio ingest/slower    %.2f  (target >= 0.85): %s\n", i / m, (i / m >= 0.85) ? "OK" : "MISSED"
}'
