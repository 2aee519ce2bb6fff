#!/usr/bin/env bash
# Backups and restores from the host, in one run, beside the peers on the
# same files: our CLI's push (full, then a 1 % delta) and pull -format raw
# of the 2-layer chain against a local agent on loopback; the disk limit
# (the faster of cat > f && sync and dd with O_DIRECT and fsync); one SHA-256
# pass beside a durable write (the bound of a push whose store hashes every
# byte); qemu-img convert; restic and borg from Debian (installed if
# missing). Prints MB/s, ratios, stored bytes and peak RSS. Every timed step
# starts after bench/lib.sh's settle (sync, then a pause), so that none
# inherits another's dirty pages or warm memory.
#
# The volume is shaped like a used VM disk (bench/cmd/mkvol): per 4 MiB,
# 2 MiB random, 1 MiB log text, 1 MiB zeros; the delta rewrites 1 % of it
# (1 MiB pieces spread evenly). Every full-backup and restore rate is over
# the same byte count: the volume's qcow2 file (its allocated data).
# CPU is counted too, as CPU-seconds (user + sys) per GiB of that file, for
# the CLI (its rusage) and the agent (/proc/<pid>/stat before and after the
# step): wall-clock rates on a shared machine are noisy, CPU is not.
#
# Usage: bench/hostpath.sh                 (2 GiB)
#        SIZE_MB=8192 PEERS=0 bench/hostpath.sh   (our rows only: RSS at 8 GiB)
#        COMPRESS=true bench/hostpath.sh   (our push with -compress)
#        BOTH=1 bench/hostpath.sh          (also our rows in the other mode: the trade-off)
#        RESTORES=5 bench/hostpath.sh      (more restore rounds)
#        PUSHES=5 bench/hostpath.sh        (more full-push rounds)
#        SETTLE=5 bench/hostpath.sh        (the pause before each step, s; default 20)
#
# The restore is measured RESTORES times (default 3). Each round runs the
# same four steps twice, qemu-img convert -t writeback and -t none (the
# faster is the round's limit), then our verified and unverified pulls:
# first from the disk (every step's inputs, the chain's qcow2 files and the
# store's blobs, evicted from the page cache before its settle, as a restore
# of an older backup finds them), then from the page cache (the inputs read
# into it first). restic and borg restore from the disk too. The table
# gives the medians of the rates and of the rounds' ratios (every round is
# printed below it): on this shared machine qemu-img's own rate swings by
# 2x between runs a minute apart. The full push likewise runs PUSHES times
# (default 3), each round right after a disk-limit measurement of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
# A 20 s pause before each step, not lib.sh's 3 s: this script frees
# 1.5-2 GB before most steps (a deleted output, evicted inputs), and the
# host takes back freed memory over tens of seconds. Filling 1.6 GB of page
# cache here took 0.6-1.8 s when 3-5 s had passed since such a free, 2.2-3.6
# s after 10-45 s: with 3 s, a step that writes through the page cache
# (qemu-img convert -t writeback, cat + sync) ran up to 1.5x faster or not,
# depending on what the step before it freed.
export SETTLE=${SETTLE:-20}
SIZE_MB=${SIZE_MB:-2048}
PEERS=${PEERS:-1}
COMPRESS=${COMPRESS:-false}   # the CLI default
BOTH=${BOTH:-}
RESTORES=${RESTORES:-3}
PUSHES=${PUSHES:-3}
DIR=${DIR:-$(mktemp -d "${TMPDIR:-/tmp}/hostpath-bench.XXXXXX")}
AGENT_PID=
export IMAGESTORE_STATE_DIR=$DIR/state   # the CLI's push cache: never the machine's own
cleanup() { [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT

if [ "$PEERS" = 1 ] && ! { command -v restic && command -v borg; } >/dev/null; then
  echo "installing restic and borgbackup"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q restic borgbackup >/dev/null
fi
go build -o "$DIR/mkvol" ./bench/cmd/mkvol
go build -o "$DIR/onepass" ./bench/cmd/onepass
go build -o "$DIR/imagestore" ./cmd/imagestore
go build -o "$DIR/imagestore-agent" ./cmd/imagestore-agent

# timed NAME CMD...: runs CMD, sets T_NAME (seconds), M_NAME (peak RSS, MiB)
# and C_NAME (CPU seconds, user + sys, of CMD and its children).
timed() {
  local name=$1; shift
  /usr/bin/time -f '%e %M %U %S' -o "$DIR/time.out" "$@" >/dev/null
  read -r t m u s < "$DIR/time.out"
  printf -v "T_$name" '%s' "$t"; printf -v "M_$name" '%s' "$((m / 1024))"
  printf -v "C_$name" '%s' "$(awk -v u="$u" -v s="$s" 'BEGIN { printf "%.2f", u + s }')"
}
# cpu_of PID: the process's CPU seconds so far (utime + stime).
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
# per_gib SECONDS: SECONDS per GiB of the qcow2's bytes.
per_gib() { awk -v s="$1" -v b="$BYTES" 'BEGIN { printf "%.2f", s / (b / 1073741824) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
mb() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1e6 }'; }
# median FILE COLUMN: the median of that column (the lower middle one for an
# even count).
median() { awk -v k="$2" '{ print $k }' "$1" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# median_ratio FILE A B: the median over the rounds (rows) of column A /
# column B, as a rate ratio (A and B are times: A's rate is the limit).
# The summaries take it rather than the ratio of the medians: a round's
# two steps run a few seconds apart, on the same state of this machine's
# disk, whose rate swings between rounds.
median_ratio() { awk -v a="$2" -v b="$3" '{ printf "%.4f\n", $a / $b }' "$1" | sort -g | awk '{ v[NR] = $1 } END { printf "%.2f", v[int((NR + 1) / 2)] }'; }

echo "volume: $SIZE_MB MiB in $DIR"
"$DIR/mkvol" -o "$DIR/vol.raw" -size "$SIZE_MB"
qemu-img convert -f raw -O qcow2 "$DIR/vol.raw" "$DIR/vol.qcow2"
cp --sparse=always "$DIR/vol.raw" "$DIR/vol2.raw"
CHG=$(( SIZE_MB / 100 > 0 ? SIZE_MB / 100 : 1 ))
"$DIR/mkvol" -o "$DIR/vol2.raw" -size "$SIZE_MB" -change "$CHG"
qemu-img create -q -f qcow2 -b vol.qcow2 -F qcow2 "$DIR/delta.qcow2"
CMDS=()
STEP=$(( SIZE_MB / CHG ))
for i in $(seq 0 $((CHG - 1))); do
  dd if="$DIR/vol2.raw" of="$DIR/piece.$i" bs=1M skip=$((i * STEP)) count=1 status=none
  CMDS+=(-c "write -s $DIR/piece.$i $((i * STEP))M 1M")
done
qemu-io -f qcow2 "${CMDS[@]}" "$DIR/delta.qcow2" >/dev/null
rm -f "$DIR"/piece.*
BYTES=$(stat -c %s "$DIR/vol.qcow2")
sync; cat "$DIR"/vol.raw "$DIR"/vol2.raw "$DIR"/vol.qcow2 "$DIR"/delta.qcow2 >/dev/null

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"

# --- disk limit: write the qcow2's bytes durably, through the page cache
# (cat, then sync) and around it (dd with O_DIRECT, then fsync); the faster
# of the two is the limit. Every timed step below starts after settle.
# disk_limit sets T_diskc, T_diskd and T_disk (the faster); it is measured
# here, and again before each of our full pushes (the push's ratio is per
# round: this disk's rate swings by 1.5x between runs a minute apart).
disk_limit() {
  settle
  local t0 t1
  t0=$(now); cat "$DIR/vol.qcow2" > "$DIR/disk.out" && sync; t1=$(now)
  T_diskc=$(sub "$t0" "$t1"); rm -f "$DIR/disk.out"; settle
  t0=$(now); dd if="$DIR/vol.qcow2" of="$DIR/disk.out" bs=4M oflag=direct conv=fsync status=none; t1=$(now)
  T_diskd=$(sub "$t0" "$t1"); rm -f "$DIR/disk.out"
  T_disk=$(awk -v a="$T_diskc" -v b="$T_diskd" 'BEGIN { print (a < b ? a : b) }')
}
disk_limit
T_disk0=$T_disk T_diskc0=$T_diskc T_diskd0=$T_diskd
# --- the bound of one SHA-256 pass (the store hashes every byte it keeps):
# openssl's SHA-256 alone over the cached qcow2, and beside the durable
# write of the same bytes (bench/cmd/onepass: the hash on one goroutine,
# the reads and writes on another, fsync at the end): the least a push
# that hashes each byte once does on this machine, before any network,
# framing or qcow2 work. (tee into openssl is no bound: its 64 KiB pipe
# writes measured slower than our push.)
settle; t0=$(now); openssl dgst -sha256 "$DIR/vol.qcow2" >/dev/null; t1=$(now); T_sha=$(sub "$t0" "$t1")
settle; t0=$(now); "$DIR/onepass" -i "$DIR/vol.qcow2" -o "$DIR/disk.out" >/dev/null; t1=$(now)
T_shaw=$(sub "$t0" "$t1"); rm -f "$DIR/disk.out"; sync
# --- qemu-img convert: a full copy, and the chain to raw.
settle; timed qconv qemu-img convert -f qcow2 -O qcow2 "$DIR/vol.qcow2" "$DIR/conv.qcow2"; rm -f "$DIR/conv.qcow2"
# qemu-img convert's default cache mode for its output is unsafe (no flush);
# pull fsyncs DST before the rename, so the ratio is against the faster of
# -t writeback and -t none (O_DIRECT), both flushed at the end: the same
# durability; the unflushed rate is shown too.
settle; timed qraw qemu-img convert -f qcow2 -O raw "$DIR/delta.qcow2" "$DIR/conv.raw"; rm -f "$DIR/conv.raw"

# --- ours: a fresh store per mode.
# ours MODE: full push, delta push, pull -format raw; sets P_*, stored bytes.
ours() {
  local mode=$1 store=$DIR/store-$1
  mkdir -p "$store"
  cat > "$DIR/agent.yaml" <<CFG
profile: imagestore
root: $store
listen: 127.0.0.1:0
registryListen: 127.0.0.1:0
logFormat: json
logLevel: info
verifyInterval: 0s
CFG
  "$DIR/imagestore-agent" -config "$DIR/agent.yaml" 2>"$DIR/agent.log" &
  AGENT_PID=$!
  local url=
  for _ in $(seq 100); do
    url=$(sed -n 's/.*"msg":"registry listening".*"addr":"\([^"]*\)".*/\1/p' "$DIR/agent.log")
    [ -n "$url" ] && break; sleep 0.1
  done
  [ -n "$url" ] || { echo "agent did not start: $(cat "$DIR/agent.log")" >&2; exit 1; }
  local cli=("$DIR/imagestore" -url "http://$url" -quiet) a0 a1 a2 a3 a4 a5
  # Full pushes: PUSHES rounds, each after a disk-limit measurement of
  # its own; the table takes the medians (every round is printed below
  # it). Rounds after the first send the same layer again under another
  # id (-mount=false: the CLI would otherwise ask the store first and send
  # nothing): the store ingests, hashes and fsyncs every byte as before,
  # then finds the blob it already has and drops the copy.
  local j id pushes=$DIR/pushes.$mode
  : > "$pushes"
  for j in $(seq "$PUSHES"); do
    disk_limit
    settle
    id=base; [ "$j" = 1 ] || id=base-r$j
    a0=$(cpu_of "$AGENT_PID")
    timed push "${cli[@]}" push -mount=false -compress="$mode" -name vol -id "$id" "$DIR/vol.qcow2"
    a1=$(cpu_of "$AGENT_PID")
    echo "$T_disk $T_push $C_push $(sub "$a0" "$a1") $M_push $T_diskc $T_diskd" >> "$pushes"
  done
  T_push=$(median "$pushes" 2) C_push=$(median "$pushes" 3)
  M_push=$(awk '$5 > m { m = $5 } END { print m }' "$pushes")
  local ap_push dl_push
  ap_push=$(median "$pushes" 4) dl_push=$(median "$pushes" 1)
  settle
  timed dpush "${cli[@]}" push -compress="$mode" -name vol -id delta -parent vol:base "$DIR/delta.qcow2"
  sync
  local d0; d0=$(cpu_of "$AGENT_PID")
  # Restores: RESTORES rounds, each of two passes over the same four
  # steps (qemu-img convert -t writeback and -t none, our verified and
  # our unverified pull): first from the disk, every step's inputs (the
  # chain's qcow2 files, the store's blobs) evicted from the page cache
  # before it starts, as a restore of an older backup finds them; then
  # from the page cache, every step's inputs read into it first. The
  # convert and the pull read the same state in each pass. The table
  # takes the medians (the rounds are printed below it).
  local i cache inputs=("$DIR/vol.qcow2" "$DIR/delta.qcow2" "$store/blobs")
  : > "$DIR/pairs.$mode.disk"; : > "$DIR/pairs.$mode.cache"
  # settle after the eviction: the pages it frees are handed back to the
  # host in the pause, not reused warm by the step's output (lib.sh).
  prep() { if [ "$cache" = disk ]; then evict "${inputs[@]}"; else warm "${inputs[@]}"; fi; settle; }
  for i in $(seq "$RESTORES"); do
    for cache in disk cache; do
      prep; timed qrawf qemu-img convert -t writeback -f qcow2 -O raw "$DIR/delta.qcow2" "$DIR/conv.raw"; rm -f "$DIR/conv.raw"
      prep; timed qrawd qemu-img convert -t none -f qcow2 -O raw "$DIR/delta.qcow2" "$DIR/conv.raw"; rm -f "$DIR/conv.raw"
      # The round's copy limit: the faster convert.
      if awk -v a="$T_qrawd" -v b="$T_qrawf" 'BEGIN { exit !(a < b) }'; then T_qrawf=$T_qrawd C_qrawf=$C_qrawd; fi
      prep; a2=$(cpu_of "$AGENT_PID")
      timed pull "${cli[@]}" pull -format raw -installpath "$DIR/pulled.raw" vol:delta
      a3=$(cpu_of "$AGENT_PID")
      cmp "$DIR/pulled.raw" "$DIR/vol2.raw" || { echo "pulled chain differs from the changed volume" >&2; exit 1; }
      rm -f "$DIR/pulled.raw"
      prep; a4=$(cpu_of "$AGENT_PID")
      timed pulln "${cli[@]}" pull -verify=false -format raw -installpath "$DIR/pulled.raw" vol:delta
      a5=$(cpu_of "$AGENT_PID")
      cmp "$DIR/pulled.raw" "$DIR/vol2.raw" || { echo "pulled chain differs from the changed volume" >&2; exit 1; }
      rm -f "$DIR/pulled.raw"; sync
      echo "$T_qrawf $T_pull $T_pulln $C_pull $(sub "$a2" "$a3") $C_pulln $(sub "$a4" "$a5") $M_pull $C_qrawf $T_qrawd" >> "$DIR/pairs.$mode.$cache"
    done
  done
  local pairs=$DIR/pairs.$mode.disk
  T_qrawf=$(median "$pairs" 1) T_pull=$(median "$pairs" 2) T_pulln=$(median "$pairs" 3)
  C_pull=$(median "$pairs" 4) C_pulln=$(median "$pairs" 6) C_qrawf=$(median "$pairs" 9)
  M_pull=$(cat "$DIR"/pairs."$mode".* | awk '$8 > m { m = $8 } END { print m }')
  local ap_pull apn_pull
  ap_pull=$(median "$pairs" 5) apn_pull=$(median "$pairs" 7)
  pairs=$DIR/pairs.$mode.cache
  printf -v "W_$mode" '%s %s %s' "$(median "$pairs" 1)" "$(median "$pairs" 2)" "$(median "$pairs" 3)"
  AGENT_RSS=$(( $(awk '/VmHWM/ { print $2 }' "/proc/$AGENT_PID/status") / 1024 ))
  kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true; AGENT_PID=
  STORED=$(du -sb "$store/blobs" | cut -f1)
  rm -rf "$store"
  printf -v "R_$mode" '%s %s %s %s %s %s %s %s %s %s %s %s' "$T_push" "$T_dpush" "$T_pull" "$STORED" "$M_push" "$M_dpush" "$M_pull" "$AGENT_RSS" "$(cut -d' ' -f1 /proc/loadavg)" "$T_pulln" "$T_qrawf" "$dl_push"
  printf -v "CPU_$mode" '%s %s %s %s %s %s %s %s %s' "$C_push" "$ap_push" "$C_dpush" "$(sub "$a1" "$d0")" "$C_pull" "$ap_pull" "$C_pulln" "$apn_pull" "$C_qrawf"
}
MODES=("$COMPRESS")
if [ -n "$BOTH" ]; then
  if [ "$COMPRESS" = true ]; then MODES+=(false); else MODES+=(true); fi
fi
for m in "${MODES[@]}"; do ours "$m"; done

# --- restic and borg (repository defaults; no encryption for borg).
if [ "$PEERS" = 1 ]; then
  export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$DIR/restic BORG_REPO=$DIR/borg BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
  restic init -q
  cp --sparse=always "$DIR/vol.raw" "$DIR/vol.img"   # one path for both snapshots
  settle; timed rfull restic backup -q "$DIR/vol.img"
  cp --sparse=always "$DIR/vol2.raw" "$DIR/vol.img"
  settle; timed rdelta restic backup -q "$DIR/vol.img"
  evict "$DIR/restic"; settle; timed rrest restic restore -q latest --target "$DIR/rrestore"
  RESTIC_STORED=$(du -sb "$DIR/restic" | cut -f1); rm -rf "$DIR/rrestore" "$DIR/restic"
  borg init --encryption=none >/dev/null
  cp --sparse=always "$DIR/vol.raw" "$DIR/vol.img"
  settle; timed bfull borg create "::a" "$DIR/vol.img"
  cp --sparse=always "$DIR/vol2.raw" "$DIR/vol.img"
  settle; timed bdelta borg create "::b" "$DIR/vol.img"
  mkdir -p "$DIR/brestore"
  evict "$DIR/borg"; settle; timed brest sh -c "cd '$DIR/brestore' && borg extract '::b'"
  BORG_STORED=$(du -sb "$DIR/borg" | cut -f1); rm -rf "$DIR/brestore" "$DIR/borg" "$DIR/vol.img"
fi

echo "load after: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
echo
echo "volume ${SIZE_MB} MiB; rates over the qcow2's $(mb "$BYTES") MB; disk limit, measured first: $(mbps "$BYTES" "$T_disk0") MB/s (the faster of: cat + sync $(mbps "$BYTES" "$T_diskc0"), dd O_DIRECT + fsync $(mbps "$BYTES" "$T_diskd0")); again before each full push (below)"
echo "one SHA-256 pass: alone $(mbps "$BYTES" "$T_sha") MB/s; beside the durable write (bench/cmd/onepass) $(mbps "$BYTES" "$T_shaw") MB/s ($(ratio "$T_disk0" "$T_shaw")× the disk limit measured first)"
echo
for m in "${MODES[@]}"; do
  v=R_$m; read -r tp td tr st mp md mr ar la trn qf dl <<<"${!v}"
  echo "### ours with push -compress=$m (load ${la} at the end)"
  echo
  echo "| step | ours | peers in the same run |"
  echo "|---|---|---|"
  peers=""
  [ "$PEERS" = 1 ] && peers=" · borg $(mbps "$BYTES" "$T_bfull") · restic $(mbps "$BYTES" "$T_rfull")"
  echo "| full backup from the host (median of $PUSHES) | push **$(mbps "$BYTES" "$tp") MB/s** ($(median_ratio "$DIR/pushes.$m" 1 2)× the disk limit of the same round, median, $(ratio "$T_shaw" "$tp")× one SHA-256 pass beside the write$([ "$PEERS" = 1 ] && echo ", $(ratio "$T_rfull" "$tp")× restic, $(ratio "$T_bfull" "$tp")× borg")) | disk limit $(mbps "$BYTES" "$dl") (median of the $PUSHES measured before each push)$peers · qemu-img convert $(mbps "$BYTES" "$T_qconv") |"
  echo "| 1 % changed ($CHG MiB) | push of the delta: ${td} s | $([ "$PEERS" = 1 ] && echo "restic ${T_rdelta} s · borg ${T_bdelta} s") |"
  v=W_$m; read -r wqf wtr wtrn <<<"${!v}"
  echo "| restore the newest backup as raw, from the disk (median of $RESTORES) | pull -format raw (-verify, the default) of the 2-layer chain: **$(mbps "$BYTES" "$tr") MB/s** ($(median_ratio "$DIR/pairs.$m.disk" 1 2)× qemu-img convert flushed of the same round, median) | qemu-img convert of the same chain $(mbps "$BYTES" "$qf") flushed (the faster of -t writeback and -t none per round, median of $RESTORES)$([ "$PEERS" = 1 ] && echo " · restic $(mbps "$BYTES" "$T_rrest") · borg $(mbps "$BYTES" "$T_brest")") |"
  echo "| the same restore with pull -verify=false | **$(mbps "$BYTES" "$trn") MB/s** ($(median_ratio "$DIR/pairs.$m.disk" 1 3)× qemu-img convert flushed of the same round, median) | |"
  echo "| the same restore from the page cache (median of $RESTORES) | pull (-verify) **$(mbps "$BYTES" "$wtr") MB/s** ($(median_ratio "$DIR/pairs.$m.cache" 1 2)×), -verify=false **$(mbps "$BYTES" "$wtrn") MB/s** ($(median_ratio "$DIR/pairs.$m.cache" 1 3)×); ratios to qemu-img convert flushed of the same round, median | qemu-img convert $(mbps "$BYTES" "$wqf") flushed, $(mbps "$BYTES" "$T_qraw") unflushed |"
  echo "| bytes stored after both backups | **$(mb "$st") MB**$([ "$PEERS" = 1 ] && echo " ($(ratio "$st" "$RESTIC_STORED")× restic)") | $([ "$PEERS" = 1 ] && echo "restic $(mb "$RESTIC_STORED") · borg $(mb "$BORG_STORED")") |"
  echo "| peak RSS (MiB) | agent $ar, CLI push $mp / delta $md / pull $mr | $([ "$PEERS" = 1 ] && echo "restic $M_rfull / $M_rrest · borg $M_bfull / $M_brest (backup / restore)") |"
  echo
  v=CPU_$m; read -r cp ap cd ad cr ar2 crn arn cqf <<<"${!v}"
  echo "CPU seconds per GiB of the qcow2 (user + sys), CLI + agent:"
  echo
  echo "| step | CLI | agent | total |"
  echo "|---|---|---|---|"
  echo "| full push | $(per_gib "$cp") | $(per_gib "$ap") | $(per_gib "$(awk -v a="$cp" -v b="$ap" 'BEGIN { print a + b }')") |"
  echo "| delta push (s, not per GiB) | $cd | $ad | $(awk -v a="$cd" -v b="$ad" 'BEGIN { printf "%.2f", a + b }') |"
  echo "| pull -format raw (from the disk) | $(per_gib "$cr") | $(per_gib "$ar2") | $(per_gib "$(awk -v a="$cr" -v b="$ar2" 'BEGIN { print a + b }')") |"
  echo "| pull -format raw -verify=false (from the disk) | $(per_gib "$crn") | $(per_gib "$arn") | $(per_gib "$(awk -v a="$crn" -v b="$arn" 'BEGIN { print a + b }')") |"
  echo "| qemu-img convert (qcow2 full copy / chain to raw, flushed, the faster mode) | $(per_gib "$C_qconv") / $(per_gib "$cqf") | | |"
  echo
  echo "full push rounds, in the order run (MB/s; ratio to the disk limit measured just before):"
  echo
  echo "| round | disk limit (faster of cat + sync / dd O_DIRECT) | push | CPU-s CLI + agent |"
  echo "|---|---|---|---|"
  i=0
  while read -r dlr tpr cpr apr _ dcr ddr; do
    i=$((i + 1))
    echo "| $i | $(mbps "$BYTES" "$dlr") ($(mbps "$BYTES" "$dcr") / $(mbps "$BYTES" "$ddr")) | $(mbps "$BYTES" "$tpr") ($(ratio "$dlr" "$tpr")×) | $cpr + $apr |"
  done < "$DIR/pushes.$m"
  echo
  echo "restore rounds, in the order run (MB/s; ratio to the faster convert of the same round and pass):"
  echo
  echo "| round | inputs | qemu-img convert, faster of -t writeback / -t none | -t none | pull (-verify) | pull -verify=false |"
  echo "|---|---|---|---|---|---|"
  i=0
  while read -r q p pn _ _ _ _ _ _ qd && read -r wq wp wpn _ _ _ _ _ _ wqd <&3; do
    i=$((i + 1))
    echo "| $i | disk | $(mbps "$BYTES" "$q") | $(mbps "$BYTES" "$qd") | $(mbps "$BYTES" "$p") ($(ratio "$q" "$p")×) | $(mbps "$BYTES" "$pn") ($(ratio "$q" "$pn")×) |"
    echo "| $i | page cache | $(mbps "$BYTES" "$wq") | $(mbps "$BYTES" "$wqd") | $(mbps "$BYTES" "$wp") ($(ratio "$wq" "$wp")×) | $(mbps "$BYTES" "$wpn") ($(ratio "$wq" "$wpn")×) |"
  done < "$DIR/pairs.$m.disk" 3< "$DIR/pairs.$m.cache"
  echo
done
