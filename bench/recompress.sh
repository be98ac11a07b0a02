#!/usr/bin/env bash
# Cold-data recompression (`gc --recompress`): the stored size of the same mixed image
# (bench/gen_image.py) in a blockproof repository written with LZ4 (the default), after
# `gc --recompress all --older-than 0` rewrote it with zstd, in one written with zstd
# from the start (level 1, `init --compression zstd`), and in restic's (its default
# compression), all in one run. Also the time the recompression took.
#   bench/recompress.sh [SIZE_MIB]   (default 1024)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1024}
command -v restic >/dev/null || { echo "restic is missing (apt-get install restic)" >&2; exit 1; }
# BLOCKPROOF=path/to/blockproof uses that build (a debug build: sizes only, no times).
if [ -z "${BLOCKPROOF:-}" ]; then
  cargo build --release -q -p blockproof
fi
bp=${BLOCKPROOF:-$PWD/target/release/blockproof}
work=$(mktemp -d /var/tmp/bp-recompress.XXXXXX)
trap 'rm -rf "$work"' EXIT
export BLOCKPROOF_PASSWORD=bench RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$work/restic-cache"
python3 bench/gen_image.py "$work/mixed.img" "$size"
du_b() { du -sb "$1" | cut -f1; }
"$bp" init --repo "$work/lz4" --kdf-memory 8 --kdf-iterations 1 >/dev/null
"$bp" init --repo "$work/zstd" --kdf-memory 8 --kdf-iterations 1 --compression zstd >/dev/null
"$bp" backup --repo "$work/lz4" --vm v --disk "id=d,source=$work/mixed.img" --verify none >/dev/null
"$bp" backup --repo "$work/zstd" --vm v --disk "id=d,source=$work/mixed.img" --verify none >/dev/null
restic init --repo "$work/restic" >/dev/null
restic -r "$work/restic" backup --quiet "$work/mixed.img"
lz4=$(du_b "$work/lz4")
start=$(date +%s.%N)
"$bp" gc --repo "$work/lz4" --recompress all --older-than 0 --json > "$work/gc.json"
end=$(date +%s.%N)
after=$(du_b "$work/lz4")
"$bp" check --repo "$work/lz4" --read-data >/dev/null
python3 - "$size" "$lz4" "$after" "$(du_b "$work/zstd")" "$(du_b "$work/restic")" "$start" "$end" "$work/gc.json" <<'PY'
import json, sys
size, lz4, after, zstd, restic = (int(x) for x in sys.argv[1:6])
secs = float(sys.argv[7]) - float(sys.argv[6])
gc = json.load(open(sys.argv[8]))
mib = lambda b: f"{b / 2**20:.1f} MiB"
print(f"mixed image {size} MiB; repository sizes (du -sb):")
print(f"  blockproof, LZ4 (default):            {mib(lz4)}")
print(f"  blockproof, after gc --recompress:    {mib(after)}  ({gc['packs_recompressed']} packs, {secs:.1f} s)")
print(f"  blockproof, zstd level 1 from start:  {mib(zstd)}")
print(f"  restic (default compression):         {mib(restic)}")
PY
