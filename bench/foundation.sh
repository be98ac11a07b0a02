#!/usr/bin/env bash
# Full backup, 1% incremental, restore and check of one generated image, with wall
# time, CPU time and peak RSS of each step (GNU time). Prints a Markdown table.
#
# usage: bench/foundation.sh [SIZE_MIB=2048] [WORKDIR=/tmp/blockproof-foundation-bench]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
size=${1:-2048}
work=${2:-/tmp/blockproof-foundation-bench}
bin="$here/../target/release/blockproof"
(cd "$here/.." && cargo build --release -q)
command -v /usr/bin/time >/dev/null || { echo "needs GNU time (apt-get install time)" >&2; exit 1; }
export BLOCKPROOF_PASSWORD=bench
rm -rf "$work" && mkdir -p "$work"
python3 "$here/gen_image.py" "$work/disk.img" "$size" 1
sync
repo_bytes() { find "$1" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }
run() { # label, command...
  local label=$1; shift
  cat "$work/disk.img" > /dev/null
  /usr/bin/time -f "%e %U %S %M" -o "$work/time" "$@" > /dev/null
  read -r wall user sys rss < "$work/time"
  printf '| %s | %.2f | %.2f | %.0f MiB |\n' "$label" "$wall" "$(awk "BEGIN{print $user+$sys}")" "$(awk "BEGIN{print $rss/1024}")"
}
"$bin" init --repo "$work/repo" >/dev/null
echo "| step ($size MiB image) | wall (s) | CPU (s) | peak RSS |"
echo "|---|---|---|---|"
run "full backup" "$bin" backup --repo "$work/repo" --vm bench --disk "id=d0,source=$work/disk.img"
full=$(repo_bytes "$work/repo")
run "second full backup, nothing changed" "$bin" backup --repo "$work/repo" --vm bench --disk "id=d0,source=$work/disk.img"
changed=$(python3 "$here/mutate.py" "$work/disk.img" 0.01 64 4 11)
before=$(repo_bytes "$work/repo")
run "backup after 1% changed (full read)" "$bin" backup --repo "$work/repo" --vm bench --disk "id=d0,source=$work/disk.img"
added=$(( $(repo_bytes "$work/repo") - before ))
run "restore to a sparse file" "$bin" restore --repo "$work/repo" bench:latest --disk d0 --to "$work/restored.img"
cmp "$work/disk.img" "$work/restored.img"
rm -f "$work/restored.img"
run "check --read-data" "$bin" check --repo "$work/repo" --read-data
echo
echo "repository after the first backup: $((full / 1048576)) MiB for a $size MiB image;"
echo "1% change: $changed bytes changed (4 KiB-aligned 64 KiB writes), $added bytes added ($(awk "BEGIN{printf \"%.2f\", $added/$changed}")x)."
echo "restored image compared with cmp: identical."
rm -rf "$work"
