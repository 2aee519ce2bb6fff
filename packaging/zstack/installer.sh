#!/bin/bash
# zstack-store.bin: imagestore as a ZStack image store (a drop-in for the
# management node's bundled installer; docs/zstack-install.md).
#
#   bash zstack-store.bin <fs_rootpath> <max_capacity>   backup storage: zstore, zstcli, init script
#   bash zstack-store.bin                                KVM host: zstcli only
#
# Everything goes under $ZSTORE_DESTDIR (default /) for a staged install.
set -euo pipefail
D=${ZSTORE_DESTDIR:-}
D=${D%/}
BIN=$D/usr/local/zstack/imagestore/bin
CERTS=$D/var/lib/zstack/imagestorebackupstorage/package/certs
LOG=$D/var/log/zstack/zstack-store/zstore.log
PIDFILE=$D/var/run/zstore.pid

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
line=$(awk '/^__IMAGESTORE_PAYLOAD__$/ { print NR + 1; exit }' "$0")
tail -n +"$line" "$0" | tar -xz -C "$tmp"

install -d -m 0755 "$BIN"
install -m 0755 "$tmp/zstcli" "$BIN/zstcli.new" && mv -f "$BIN/zstcli.new" "$BIN/zstcli"
if [ $# -eq 0 ]; then
	echo "imagestore client installed: $BIN/zstcli ($("$BIN/zstcli" -version))"
	exit 0
fi
if [ $# -ne 2 ]; then
	echo "usage: bash $0 [<fs_rootpath> <max_capacity>]" >&2
	exit 2
fi
root=$1
quota=$2

# A running daemon keeps its executable; replace it by rename. The old
# daemon's /proc/<pid>/exe then reads "…/zstore (deleted)": the init script
# finds it by the pid file and by that form, so the playbook's stop && start
# replaces it.
install -m 0755 "$tmp/zstore" "$BIN/zstore.new" && mv -f "$BIN/zstore.new" "$BIN/zstore"
install -d -m 0755 "$D$root" "$D$root/registry" "$(dirname "$LOG")"
cat >"$BIN/zstore.yaml.new" <<YAML
# Written by zstack-store.bin on every deploy (imagestore, profile zstack:
# :8001 plain for the management node, :8000 HTTPS with the deployed
# certificate). Every key: imagestore-agent -print-config.
profile: zstack
root: $D$root
quota: $quota
registryTLS:
  cert: $CERTS/ca.pem
  key: $CERTS/privkey.pem
pidFile: $PIDFILE
YAML
mv -f "$BIN/zstore.yaml.new" "$BIN/zstore.yaml"
sed -e "s|@BIN@|$BIN|" -e "s|@LOG@|$LOG|" -e "s|@PIDFILE@|$PIDFILE|" "$tmp/zstack-imagestorebackupstorage" >"$BIN/zstack-imagestorebackupstorage"
chmod 0755 "$BIN/zstack-imagestorebackupstorage"
echo "imagestore server installed: $BIN/zstore ($("$BIN/zstore" -version)), store $D$root, quota $quota"
exit 0
__IMAGESTORE_PAYLOAD__
