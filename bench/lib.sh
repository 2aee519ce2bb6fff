# Shared by the bench scripts (source it): the build settings, timing
# helpers and a throwaway sshd on loopback.

# Measure the binaries the packages ship: static, like packaging/deb/build.sh
# builds them. A cgo build starts through the dynamic loader and glibc's
# threads, which costs a few ms per CLI call (a small incremental backup is
# one call of ~50 ms).
export CGO_ENABLED=0

now() { date +%s.%N; }
# settle: call before each timed step, so that every step starts from the
# same state: no earlier step's dirty pages left to write back, and the
# memory freed by deleting an earlier step's output handed back to the host
# (a VM with balloon free-page reporting starts that about 2 s after a
# free, and a free of some GB takes tens of seconds to hand back; the next
# use of such a page costs a host fault, ~11 us per 4 KiB, so whichever
# step came first after a delete wrote into warm memory and ran up to 3x
# faster than one that came later). Scripts that free GBs between steps
# set SETTLE longer (bench/hostpath.sh: 20 s).
settle() { sync; sleep "${SETTLE:-3}"; }
# evict PATH...: drop the page cache of every file under PATHs (clean pages:
# call it after a sync), so that the next step reads them from the disk, as
# a restore of last week's backup does. posix_fadvise(DONTNEED) through
# dd's nocache flag: no root needed, and only these files are touched.
evict() { find "$@" -type f -exec sh -c 'for f; do dd if="$f" iflag=nocache count=0 status=none; done' sh {} +; }
# warm PATH...: read every file under PATHs into the page cache.
warm() { find "$@" -type f -exec cat {} + >/dev/null; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", b / 1e6 / s }'; }

# start_sshd: an sshd on a free loopback port with its own host key, our
# client key ($DIR/client_ed25519) authorised and $DIR/known_hosts naming
# it; waits until a login works. Needs DIR and USER; sets PORT, SSHD_PID
# and SSH_OPTS (ssh's options to reach it). The caller kills SSHD_PID.
start_sshd() {
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  ssh-keygen -q -t ed25519 -N '' -f "$DIR/host_ed25519"
  ssh-keygen -q -t ed25519 -N '' -f "$DIR/client_ed25519"
  cp "$DIR/client_ed25519.pub" "$DIR/authorized_keys"
  echo "[127.0.0.1]:$PORT $(cut -d' ' -f1,2 "$DIR/host_ed25519.pub")" > "$DIR/known_hosts"
  cat > "$DIR/sshd_config" <<CFG
Port $PORT
ListenAddress 127.0.0.1
HostKey $DIR/host_ed25519
PidFile $DIR/sshd.pid
AuthorizedKeysFile $DIR/authorized_keys
PermitRootLogin yes
StrictModes no
UsePAM no
PasswordAuthentication no
Subsystem sftp internal-sftp
UseDNS no
CFG
  /usr/sbin/sshd -D -e -f "$DIR/sshd_config" 2>"$DIR/sshd.log" &
  SSHD_PID=$!
  SSH_OPTS=(-p "$PORT" -i "$DIR/client_ed25519" -o UserKnownHostsFile="$DIR/known_hosts" -o StrictHostKeyChecking=yes -o BatchMode=yes)
  for _ in $(seq 100); do ssh "${SSH_OPTS[@]}" "$USER@127.0.0.1" true 2>/dev/null && return 0; sleep 0.1; done
  echo "sshd on port $PORT did not accept a login; see $DIR/sshd.log" >&2
  return 1
}
