#!/usr/bin/env bash
# Benchmarks imagestore's qcow2 Flatten and Normalize against qemu-img.
#
#   bench/qcow2.sh            # 2 GiB, 10-layer chain; 1 GiB delta
#   SIZE_MB=512 bench/qcow2.sh
#
# Builds the chain with qemu-img/qemu-io (base: random data; each overlay
# rewrites ~8% of the disk), then times:
#   flatten   ours (Flatten → qcow2 / raw)  vs  qemu-img convert -O qcow2 / raw
#   normalize ours (Normalize of a delta)   vs  qemu-img convert -O qcow2 -B base
# Prints MB/s of guest bytes, the ratio ours/qemu (>1 = we are faster) and peak RSS.
set -euo pipefail
SIZE_MB=${SIZE_MB:-2048}
LAYERS=${LAYERS:-10}
DELTA_MB=${DELTA_MB:-$((SIZE_MB / 2))}
cd "$(dirname "$0")/.."
. bench/lib.sh
# tmpfs by default: the VM's disk, not the tools, would otherwise dominate.
BENCH_DIR=${BENCH_DIR:-$( [ -w /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")}
work=$(mktemp -d "$BENCH_DIR/qcow2bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
go build -o "$work/qcow2bench" ./bench/cmd/qcow2bench

for t in qemu-img qemu-io; do command -v $t >/dev/null || { echo "$t missing (make deps)" >&2; exit 1; }; done
TIME=""; [ -x /usr/bin/time ] && TIME="/usr/bin/time -f %M"

echo "building a ${SIZE_MB} MiB, ${LAYERS}-layer chain in $work"
head -c $((SIZE_MB << 20)) /dev/urandom >"$work/base.raw"
# Leave holes in the base so zero handling is exercised too.
for i in $(seq 0 $((SIZE_MB / 64 - 1))); do
  [ $((i % 5)) = 4 ] && dd if=/dev/zero of="$work/base.raw" bs=1M seek=$((i * 64)) count=16 conv=notrunc status=none
done
qemu-img convert -q -O qcow2 "$work/base.raw" "$work/l00.qcow2"
rm -f "$work/base.raw"
layers=("$work/l00.qcow2")
for i in $(seq 1 $((LAYERS - 1))); do
  l=$(printf "%s/l%02d.qcow2" "$work" "$i")
  qemu-img create -q -f qcow2 -b "$(basename "${layers[-1]}")" -F qcow2 "$l" "${SIZE_MB}M"
  cmds=()
  for j in $(seq 0 15); do
    off=$(( ((i * 7919 + j * 104729) % (SIZE_MB * 16)) * 65536 ))
    len=$(( (SIZE_MB << 20) * 8 / 100 / 16 / 65536 * 65536 ))
    [ $((off + len)) -gt $((SIZE_MB << 20)) ] && off=$(( (SIZE_MB << 20) - len ))
    cmds+=(-c "write -P $(( (i * 16 + j) % 255 + 1 )) $off $len")
  done
  cmds+=(-c "write -z $(( (i * 64 % SIZE_MB) << 20 )) 1M")
  qemu-io -f qcow2 "${cmds[@]}" "$l" >/dev/null
  layers+=("$l")
done
top=${layers[-1]}

# timeit LABEL CMD... → runs CMD REPEAT times (default 3) and keeps the
# fastest run (the machine may be shared), setting SECS and RSS (KiB).
REPEAT=${REPEAT:-3}
timeit() {
  local label=$1; shift
  local best="" bestrss=0 start end secs rss
  for _ in $(seq "$REPEAT"); do
    sync
    start=$(date +%s.%N)
    if [ -n "$TIME" ]; then rss=$($TIME "$@" 2>&1 >/dev/null | tail -1); else "$@" >/dev/null; rss=0; fi
    end=$(date +%s.%N)
    secs=$(echo "$end - $start" | bc -l)
    if [ -z "$best" ] || [ "$(echo "$secs < $best" | bc -l)" = 1 ]; then best=$secs; fi
    [ "$rss" -gt "$bestrss" ] && bestrss=$rss
  done
  SECS=$best RSS=$bestrss
  printf "%-34s %7.2f s %8.1f MB/s  maxrss %6.1f MiB\n" "$label" "$SECS" \
    "$(echo "$SIZE_MB * 1.048576 / $SECS" | bc -l)" "$(echo "$RSS / 1024" | bc -l)"
}

# pair NAME QEMU-OUT OURS-OUT QEMU-CMD... -- OURS-CMD...: times both, checks, removes outputs.
pair() {
  local name=$1 qout=$2 oout=$3; shift 3
  local qcmd=() ocmd=()
  while [ "$1" != "--" ]; do qcmd+=("$1"); shift; done; shift
  ocmd=("$@")
  timeit "qemu-img $name" "${qcmd[@]}"; local q=$SECS
  local qsize; qsize=$(stat -c %s "$qout"); rm -f "$qout"
  timeit "ours     $name" "${ocmd[@]}"; local o=$SECS
  printf "ratio %-10s (qemu time / our time): %.2f   sizes: qemu %s, ours %s\n" "$name" "$(echo "$q / $o" | bc -l)" \
    "$qsize" "$(stat -c %s "$oout")"
  if [ "${oout%.raw}" = "$oout" ]; then qemu-img check -q "$oout"; fi
  qemu-img compare -q "$oout" "$top"
  rm -f "$oout"
}

echo
echo "== flatten of the ${LAYERS}-layer chain (${SIZE_MB} MiB guest) =="
pair qcow2 "$work/q.qcow2" "$work/o.qcow2" qemu-img convert -O qcow2 "$top" "$work/q.qcow2" -- \
  "$work/qcow2bench" flatten -o "$work/o.qcow2" "${layers[@]}"
pair raw "$work/q.raw" "$work/o.raw" qemu-img convert -O raw "$top" "$work/q.raw" -- \
  "$work/qcow2bench" flatten -format raw -o "$work/o.raw" "${layers[@]}"
pair zstd "$work/q.qcow2" "$work/o.qcow2" qemu-img convert -c -o compression_type=zstd -O qcow2 "$top" "$work/q.qcow2" -- \
  "$work/qcow2bench" flatten -zstd -o "$work/o.qcow2" "${layers[@]}"

echo
echo "== normalize of a ${DELTA_MB} MiB delta =="
d="$work/delta.qcow2"
qemu-img create -q -f qcow2 -b l00.qcow2 -F qcow2 "$d" "${SIZE_MB}M"
qemu-io -f qcow2 -c "write -P 0x5a 0 ${DELTA_MB}M" "$d" >/dev/null
SIZE_MB_SAVE=$SIZE_MB; SIZE_MB=$DELTA_MB # MB/s of the delta's bytes
timeit "qemu-img convert (delta, -B base)" qemu-img convert -O qcow2 -B l00.qcow2 -F qcow2 "$d" "$work/qemu-n.qcow2"; q=$SECS
rm -f "$work/qemu-n.qcow2"
timeit "qcow2bench normalize" "$work/qcow2bench" normalize -backing l00.qcow2 -o "$work/ours-n.qcow2" "$d"; o=$SECS
SIZE_MB=$SIZE_MB_SAVE
printf "ratio normalize (qemu time / our time): %.2f\n" "$(echo "$q / $o" | bc -l)"
qemu-img check -q "$work/ours-n.qcow2"
qemu-img compare -q "$work/ours-n.qcow2" "$d"
echo "ok: outputs pass qemu-img check and compare"
