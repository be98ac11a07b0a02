#!/usr/bin/env bash
# Measures what the chunk size costs: bytes added to the repository by an incremental
# after 2% of an image changed in scattered 64 KiB writes (64 KiB- and 4 KiB-aligned),
# index size, file count and full-backup time. Results go to stdout as a Markdown table.
#
# usage: bench/chunk_size.sh [SIZE_MIB=2048] [WORKDIR=/tmp/blockproof-chunk-bench]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
size=${1:-2048}
work=${2:-/tmp/blockproof-chunk-bench}
bin="$here/../target/release/blockproof"
(cd "$here/.." && cargo build --release -q)
export BLOCKPROOF_PASSWORD=bench
rm -rf "$work" && mkdir -p "$work"
python3 "$here/gen_image.py" "$work/base.img" "$size" 1
for align in 64 4; do
  cp --sparse=always "$work/base.img" "$work/changed-$align.img"
  python3 "$here/mutate.py" "$work/changed-$align.img" 0.02 64 "$align" 7 > "$work/changed-$align.bytes"
done
# Let the writeback of the generated images finish so it does not slow the backups.
sync
repo_bytes() { find "$1" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }
repo_files() { find "$1" -type f | wc -l; }

echo "| chunk size | full backup (s) | repository after full | files | added by incremental, 64 KiB-aligned writes | amplification | added, 4 KiB-aligned writes | amplification |"
echo "|---|---|---|---|---|---|---|---|"
for cs in 32KiB 64KiB 128KiB 256KiB 1MiB 4MiB; do
  row="| $cs"
  for align in 64 4; do
    repo="$work/repo-$cs-$align"
    "$bin" init --repo "$repo" --chunk-size "$cs" --kdf-memory 8 --kdf-iterations 1 >/dev/null
    cat "$work/base.img" > /dev/null   # same page-cache state for every chunk size
    start=$(date +%s.%N)
    "$bin" backup --repo "$repo" --vm bench --disk "id=d0,source=$work/base.img" >/dev/null
    end=$(date +%s.%N)
    before=$(repo_bytes "$repo")
    if [ "$align" = 64 ]; then
      row="$row | $(awk "BEGIN{printf \"%.2f\", $end - $start}") | $(awk "BEGIN{printf \"%.0f MiB\", $before / 1048576}") | $(repo_files "$repo")"
    fi
    "$bin" backup --repo "$repo" --vm bench --disk "id=d0,source=$work/changed-$align.img" >/dev/null
    after=$(repo_bytes "$repo")
    changed=$(cat "$work/changed-$align.bytes")
    added=$((after - before))
    row="$row | $(awk "BEGIN{printf \"%.1f MiB\", $added / 1048576}") | $(awk "BEGIN{printf \"%.2fx\", $added / $changed}")"
    rm -rf "$repo"
  done
  echo "$row |"
done
echo
echo "changed bytes: $(cat "$work/changed-64.bytes") (2% of $size MiB, 64 KiB writes)"
rm -rf "$work"
