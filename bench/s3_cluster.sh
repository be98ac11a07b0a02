#!/usr/bin/env bash
# Backup and restore throughput to a Garage cluster on loopback (3 nodes by default,
# replication factor 3, every node's endpoint in --s3-endpoint: bench/garage.sh DIR BUCKET
# NODES) against a local directory, side by side, on the same mixed image in one run.
# Each run makes a fresh local repository and a fresh S3 prefix, backs the image up to
# both and restores it from both (bit-exact, checked with cmp).
#
# usage: bench/s3_cluster.sh [--size MIB] [--runs N] [--nodes N]   (default 1024 MiB, 3, 3)
# Two placements: "shared" lets blockproof and the Garage nodes compete for every core;
# "separate" pins blockproof to core 0 and every node to the other cores (taskset,
# util-linux), as when the store is other machines. Needs garage (cargo install garage
# --locked; the release build: a debug Garage measures itself). Prints Markdown; not CI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
size=1024
runs=3
nodes=3
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
(cd "$root" && cargo build --release -q -p blockproof)
bp="$root/target/release/blockproof"
work=$(mktemp -d /tmp/blockproof-s3cluster.XXXXXX)
trap 'kill $(cat "$work/garage/garage.pid" 2>/dev/null) 2>/dev/null; rm -rf "$work"' EXIT
eval "$("$here/garage.sh" "$work/garage" bench "$nodes")"
export BLOCKPROOF_PASSWORD=bench BLOCKPROOF_CACHE_DIR="$work/cache" BLOCKPROOF_S3_STATS=1
python3 "$here/gen_image.py" "$work/mixed.img" "$size" >/dev/null
cat "$work/mixed.img" > /dev/null
mapfile -t gpids < "$work/garage/garage.pid"

# Runs "$@" and prints: wall seconds, then the request counts (JSON or {}).
timed() {
  /usr/bin/time -f "%e" -o "$work/time" "$@" > "$work/out" 2> "$work/err" || { cat "$work/err" >&2; exit 1; }
  local reqs
  reqs=$(sed -n 's/^blockproof: s3 requests: //p' "$work/err" | tail -1)
  echo "$(cat "$work/time") ${reqs:-{\}}"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# CPU seconds (user + system) of every Garage node so far.
garage_cpu() { for p in "${gpids[@]}"; do cat "/proc/$p/stat"; done | awk '{s += $14 + $15} END {printf "%.2f", s/100}'; }
pin_garage() { for p in "${gpids[@]}"; do taskset -apc "$1" "$p" >/dev/null; done; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.0f%%", 100*a/b}'; }
get() { python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2], 0))' "$1" "$2"; }
all=0-$(($(nproc) - 1))
rest=1-$(($(nproc) - 1))

echo "| run | placement | backup: local (s) | backup: s3 (s) | s3 / local | restore: local (s) | restore: s3 (s) | s3 / local | Garage CPU, backup / restore (s) | PUTs / GETs |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for placement in shared separate; do : > "$work/$placement.r"; done
n=0
for i in $(seq "$runs"); do
  for placement in shared separate; do
    n=$((n + 1))
    if [ "$placement" = shared ]; then pin=(); pin_garage "$all"
    else pin=(taskset -c 0); pin_garage "$rest"; fi
    rm -rf "$work/local"
    "$bp" init --repo "$work/local" --kdf-memory 8 --kdf-iterations 1 >/dev/null
    read -r lb _ < <(timed "${pin[@]}" "$bp" backup --repo "$work/local" --vm v --disk "id=d,source=$work/mixed.img")
    read -r lr _ < <(timed "${pin[@]}" "$bp" restore --repo "$work/local" v:latest --disk d --to "$work/restored.img")
    cmp "$work/mixed.img" "$work/restored.img"
    rm -f "$work/restored.img"
    repo="s3://bench/run$n"
    "$bp" init --repo "$repo" --kdf-memory 8 --kdf-iterations 1 >/dev/null
    c0=$(garage_cpu)
    read -r sb breq < <(timed "${pin[@]}" "$bp" backup --repo "$repo" --vm v --disk "id=d,source=$work/mixed.img")
    c1=$(garage_cpu)
    read -r sr rreq < <(timed "${pin[@]}" "$bp" restore --repo "$repo" v:latest --disk d --to "$work/restored.img" --no-cache)
    c2=$(garage_cpu)
    cmp "$work/mixed.img" "$work/restored.img"
    rm -f "$work/restored.img"
    gcpu=$(awk -v a="$c0" -v b="$c1" -v c="$c2" 'BEGIN{printf "%.1f / %.1f", b-a, c-b}')
    echo "$lb $sb $lr $sr" >> "$work/$placement.r"
    echo "| $i | $placement | $lb | $sb | $(pct "$lb" "$sb") | $lr | $sr | $(pct "$lr" "$sr") | $gcpu | $(get "$breq" put) / $(get "$rreq" get) |"
  done
done
pin_garage "$all"
echo
for placement in shared separate; do
  col() { cut -d' ' -f"$1" < "$work/$placement.r" | median; }
  lb=$(col 1); sb=$(col 2); lr=$(col 3); sr=$(col 4)
  rate() { awk -v s="$size" -v t="$1" 'BEGIN{printf "%.0f", s/t}'; }
  echo "- $placement, medians: backup local $lb s ($(rate "$lb") MiB/s of image), s3 $sb s ($(rate "$sb") MiB/s): $(pct "$lb" "$sb") of local; restore local $lr s ($(rate "$lr") MiB/s), s3 $sr s ($(rate "$sr") MiB/s): $(pct "$lr" "$sr") of local"
done
echo "- stored by the last backup: $(du -sh "$work/local" | cut -f1) in the local repository; Garage data on all nodes: $(du -sh "$work/garage" | cut -f1) ($n repositories, $nodes replicas)"
