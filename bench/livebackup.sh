#!/usr/bin/env bash
# Live backup of a running VM (QEMU under TCG, no guest OS), in one run
# beside qemu-img convert of the same disk (the copy limit): a 4 GiB disk
# holding 2 GiB of data (1 MiB random pieces, every other MiB), backed up
# full with `imagestore batbak` into a directory, then 1 % of the data is
# rewritten (64 KiB pieces spread evenly, through the guest's device) and
# backed up again (auto → incremental). Prints wall time, bytes moved (the
# targets' allocated bytes) and MB/s, and the ratios the targets name.
#
# Usage: bench/livebackup.sh
#        SIZE_MB=1024 DATA_MB=512 CHANGE=1 ROUNDS=3 bench/livebackup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
command -v qemu-system-x86_64 >/dev/null || { echo "needs qemu-system-x86 (make deps)" >&2; exit 1; }
mkdir -p bin
go build -o bin/imagestore ./cmd/imagestore
go build -o bin/livebench ./bench/cmd/livebench
exec bin/livebench -cli bin/imagestore -size "${SIZE_MB:-4096}" -data "${DATA_MB:-2048}" -change "${CHANGE:-1}" -rounds "${ROUNDS:-3}"
