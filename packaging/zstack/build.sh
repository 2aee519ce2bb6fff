#!/usr/bin/env bash
# Builds ${OUT:-dist}/zstack-store.bin (make zstack-store): installer.sh
# followed by a tar.gz of zstore (the daemon), zstcli (the host CLI) and the
# init script. One file serves both roles, as the management node expects:
# with <fs_rootpath> <max_capacity> it installs the server, without
# arguments the client only. GOARCH=arm64 builds zstack-store.aarch64.bin.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
GO=${GO:-go}
out=${OUT:-dist}
name=zstack-store.bin
case "${GOARCH:-$("$GO" env GOARCH)}" in
amd64) ;;
arm64) name=zstack-store.aarch64.bin ;;
loong64) name=zstack-store.loongarch64.bin ;;
mips64le) name=zstack-store.mips64el.bin ;;
*) echo "unsupported GOARCH" >&2; exit 2 ;;
esac
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
CGO_ENABLED=0 "$GO" build -buildvcs=true -trimpath -o "$stage/zstore" ./cmd/imagestore-agent
CGO_ENABLED=0 "$GO" build -buildvcs=true -trimpath -o "$stage/zstcli" ./cmd/imagestore
install -m 0755 "$here/zstack-imagestorebackupstorage" "$stage/zstack-imagestorebackupstorage"
mkdir -p "$out"
{
	cat "$here/installer.sh"
	tar -C "$stage" -cz --owner=0 --group=0 zstore zstcli zstack-imagestorebackupstorage
} >"$out/$name.tmp"
mv "$out/$name.tmp" "$out/$name"
echo "$out/$name"
