#!/usr/bin/env bash
# Prints the Debian version of this checkout: the release tag (vX.Y.Z ->
# X.Y.Z) at HEAD, else 0.0.0~git<commit time>.<short commit>; +dirty when
# the tree has uncommitted changes. Increases with every commit on a branch,
# as dpkg compares versions.
set -euo pipefail
cd "$(dirname "$0")/.."
if tag=$(git describe --tags --exact-match --match 'v[0-9]*' 2>/dev/null); then
  v=${tag#v}
else
  v="0.0.0~git$(TZ=UTC git log -1 --format=%cd --date=format-local:%Y%m%d%H%M%S).$(git rev-parse --short=12 HEAD)"
fi
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  v="$v+dirty"
fi
echo "$v"
