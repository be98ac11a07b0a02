#!/usr/bin/env bash
# NBD read throughput over a unix socket from qemu-nbd: blockproof's client (at the depth
# and request size blockproof uses, and one request at a time) against nbdcopy to null:,
# on the same export in the same run. Best of three runs each. Prints a Markdown table.
#
# usage: bench/nbd_read.sh [SIZE_MIB=2048] [WORKDIR=/tmp/blockproof-nbd-bench]
# needs: qemu-utils (qemu-nbd), libnbd-bin (nbdcopy; installed with apt-get when root)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
size=${1:-2048}
work=${2:-/tmp/blockproof-nbd-bench}
if ! command -v nbdcopy >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing libnbd-bin (nbdcopy) with apt-get" >&2
    apt-get install -y -qq libnbd-bin >/dev/null
  else
    echo "needs nbdcopy: apt-get install libnbd-bin" >&2; exit 1
  fi
fi
(cd "$here/.." && cargo build --release -q -p blockproof-nbd --example nbd_read)
reader="$here/../target/release/examples/nbd_read"
rm -rf "$work" && mkdir -p "$work"
python3 "$here/gen_image.py" "$work/disk.img" "$size" 1 >/dev/null
sock="$work/nbd.sock"
qemu-nbd --read-only --persistent --shared=8 -f raw -k "$sock" "$work/disk.img" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
uri="nbd+unix:///?socket=$sock"
cat "$work/disk.img" >/dev/null
best() { # prints the best wall time of three runs of the command
  local b=
  for _ in 1 2 3; do
    local t0 t1
    t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N)
    b=$(awk -v b="$b" -v t="$(awk "BEGIN{print $t1-$t0}")" 'BEGIN{ if (b == "" || t < b) print t; else print b }')
  done
  echo "$b"
}
bytes=$((size * 1048576))
row() { printf '| %s | %.2f | %.2f |\n' "$1" "$2" "$(awk "BEGIN{print $bytes/$2/1073741824}")"; }
t_copy=$(best nbdcopy "$uri" null:)
t_bp=$(best "$reader" "$uri" 16 65536 262144)
t_bp1=$(best "$reader" "$uri" 1 65536 262144)
echo "| reader ($size MiB export, unix socket, qemu-nbd) | wall (s) | GiB/s |"
echo "|---|---|---|"
row "nbdcopy to null: (default: 4 connections × 64 requests)" "$t_copy"
row "blockproof-nbd, 16 requests in flight, 256 KiB requests (as in a backup)" "$t_bp"
row "blockproof-nbd, one request at a time" "$t_bp1"
echo
awk -v a="$t_copy" -v b="$t_bp" 'BEGIN{printf "blockproof-nbd reads at %.0f%% of nbdcopy'"'"'s throughput.\n", 100*a/b}'
