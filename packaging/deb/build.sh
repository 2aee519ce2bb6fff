#!/usr/bin/env bash
# Builds the Debian packages with plain dpkg-deb (make deb):
#   imagestore-agent_<version>_<arch>.deb   the daemon, its systemd unit and config
#   imagestore-client_<version>_<arch>.deb  the host CLI, also installed as zstcli
# into ${OUT:-dist}/. Plain dpkg-deb because it is on every Debian machine and
# two small binary packages need no build system: the layout below is the whole
# packaging, and the maintainer scripts beside this file are the only logic.
# Binaries are static (CGO_ENABLED=0) and stamped with the commit by the Go
# toolchain (-buildvcs=true): imagestore-agent -version, imagestore -version and
# the imagestore_build_info metric say which build runs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
GO=${GO:-go}
out=${OUT:-dist}
version=$(packaging/version.sh)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

build() { CGO_ENABLED=0 "$GO" build -buildvcs=true -trimpath -o "$1" "$2"; }
build "$stage/imagestore-agent" ./cmd/imagestore-agent
build "$stage/imagestore" ./cmd/imagestore

control() { # control DIR PACKAGE DEPENDS DESCRIPTION...
  local dir=$1 pkg=$2 deps=$3
  shift 3
  local size
  size=$(du -sk --exclude=DEBIAN "$dir" | cut -f1)
  mkdir -p "$dir/DEBIAN"
  {
    echo "Package: $pkg"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: imagestore maintainers <imagestore@localhost>"
    echo "Installed-Size: $size"
    [ -n "$deps" ] && echo "Depends: $deps"
    echo "Section: admin"
    echo "Priority: optional"
    echo "Homepage: file:///usr/share/doc/$pkg"
    printf 'Description: %s\n' "$1"
    shift
    for l in "$@"; do printf ' %s\n' "$l"; done
  } >"$dir/DEBIAN/control"
}

# The daemon.
srv=$stage/agent
install -D -m 0755 "$stage/imagestore-agent" "$srv/usr/bin/imagestore-agent"
install -d -m 0755 "$srv/lib/systemd/system"
sed -e 's|^ExecStart=/usr/local/bin/|ExecStart=/usr/bin/|' \
    -e 's|^Documentation=.*|Documentation=file:///usr/share/doc/imagestore-agent/agent-protocol.md|' \
    systemd/imagestore-agent.service >"$srv/lib/systemd/system/imagestore-agent.service"
chmod 0644 "$srv/lib/systemd/system/imagestore-agent.service"
install -D -m 0640 "$here/imagestore-agent.yaml" "$srv/etc/imagestore/imagestore-agent.yaml"
install -D -m 0644 docs/agent-protocol.md "$srv/usr/share/doc/imagestore-agent/agent-protocol.md"
install -m 0644 systemd/imagestore-agent.yaml "$srv/usr/share/doc/imagestore-agent/imagestore-agent.yaml.example"
install -m 0644 README.md "$srv/usr/share/doc/imagestore-agent/README.md"
control "$srv" imagestore-agent "qemu-utils, adduser, init-system-helpers" \
  "imagestore backup storage daemon" \
  "Content-addressed image and backup store: the management protocol on" \
  "port 8001, the registry on port 8000, NBD targets through qemu-nbd."
echo /etc/imagestore/imagestore-agent.yaml >"$srv/DEBIAN/conffiles"
for s in postinst prerm postrm; do install -m 0755 "$here/agent.$s" "$srv/DEBIAN/$s"; done

# The host CLI.
cli=$stage/client
install -D -m 0755 "$stage/imagestore" "$cli/usr/bin/imagestore"
ln -s imagestore "$cli/usr/bin/zstcli"
install -d -m 0755 "$cli/usr/share/bash-completion/completions"
"$stage/imagestore" completion bash >"$cli/usr/share/bash-completion/completions/imagestore"
install -D -m 0644 docs/cli.md "$cli/usr/share/doc/imagestore-client/cli.md"
install -m 0644 docs/zstcli.md "$cli/usr/share/doc/imagestore-client/zstcli.md"
control "$cli" imagestore-client "" \
  "imagestore host client (imagestore, zstcli)" \
  "Pushes and pulls images and backups to an imagestore daemon; called as" \
  "zstcli it takes the argument vectors of the cloud's host agents."

mkdir -p "$out"
dpkg-deb --root-owner-group -Zxz --build "$srv" "$out/imagestore-agent_${version}_${arch}.deb" >/dev/null
dpkg-deb --root-owner-group -Zxz --build "$cli" "$out/imagestore-client_${version}_${arch}.deb" >/dev/null
echo "$out/imagestore-agent_${version}_${arch}.deb"
echo "$out/imagestore-client_${version}_${arch}.deb"
