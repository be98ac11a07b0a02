#!/usr/bin/env bash
# blockproof to a local directory against blockproof to a Garage node on loopback, on the
# same mixed image in one run: full backup (throughput ratio, the >= 70% bar of
# docs/OBJECT-STORAGE.md), the requests each operation sends (the cost model), an
# incremental after 1% changed (change list), restore and check --read-data.
#
# usage: bench/s3.sh [--size MIB] [--runs N]     (default 2048 MiB, 3 runs of each backup)
# Needs taskset (util-linux) for the "separate" placement.
# Needs garage (cargo install garage --locked). Prints Markdown; not part of CI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
size=2048
runs=3
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
(cd "$root" && cargo build --release -q)
bp="$root/target/release/blockproof"
work=$(mktemp -d /tmp/blockproof-s3bench.XXXXXX)
trap 'kill $(cat "$work/garage/garage.pid" 2>/dev/null) 2>/dev/null; rm -rf "$work"' EXIT
eval "$("$here/garage.sh" "$work/garage" bench)"
export BLOCKPROOF_PASSWORD=bench BLOCKPROOF_CACHE_DIR="$work/cache" BLOCKPROOF_S3_STATS=1
python3 "$here/gen_image.py" "$work/mixed.img" "$size" >/dev/null
cat "$work/mixed.img" > /dev/null

# Runs "$@" and prints: wall seconds, peak RSS KiB, and the request counts (JSON or {}).
timed() {
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" > "$work/out" 2> "$work/err" || { cat "$work/err" >&2; exit 1; }
  local reqs
  reqs=$(sed -n 's/^blockproof: s3 requests: //p' "$work/err" | tail -1)
  echo "$(cat "$work/time") ${reqs:-{\}}"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b/1048576}'; }

gpid=$(cat "$work/garage/garage.pid")
garage_cpu() { awk '{printf "%.2f", ($14+$15)/100}' "/proc/$gpid/stat"; }
# Two placements: "shared" lets blockproof and Garage compete for every core (Garage's own
# MD5 and BLAKE2 hashing then take CPU from the backup); "separate" pins blockproof to core
# 0 and Garage to core 1, as when the store is another machine.
echo "| run | placement | local dir (s) | Garage s3:// (s) | s3 / local throughput | Garage CPU (s) |"
echo "|---|---|---|---|---|---|"
: > "$work/shared.r"; : > "$work/separate.r"
n=0
for i in $(seq "$runs"); do
  for placement in shared separate; do
    n=$((n + 1))
    if [ "$placement" = shared ]; then pin=(); taskset -apc 0-$(($(nproc) - 1)) "$gpid" >/dev/null
    else pin=(taskset -c 0); taskset -apc 1 "$gpid" >/dev/null; fi
    rm -rf "$work/local"
    "$bp" init --repo "$work/local" --kdf-memory 8 --kdf-iterations 1 >/dev/null
    read -r lt _ _ < <(timed "${pin[@]}" "$bp" backup --repo "$work/local" --vm v --disk "id=d,source=$work/mixed.img")
    "$bp" init --repo "s3://bench/run$n" --kdf-memory 8 --kdf-iterations 1 >/dev/null
    c0=$(garage_cpu)
    read -r st srss sreq < <(timed "${pin[@]}" "$bp" backup --repo "s3://bench/run$n" --vm v --disk "id=d,source=$work/mixed.img")
    gc=$(awk -v a="$c0" -v b="$(garage_cpu)" 'BEGIN{printf "%.1f", b-a}')
    ratio=$(awk -v a="$lt" -v b="$st" 'BEGIN{printf "%.0f%%", 100*a/b}')
    echo "$lt $st" >> "$work/$placement.r"
    echo "| $i | $placement | $lt | $st | $ratio | $gc |"
    full_req=$sreq; full_rss=$srss
  done
done
taskset -apc 0-$(($(nproc) - 1)) "$gpid" >/dev/null
echo
for placement in shared separate; do
  lm=$(cut -d' ' -f1 < "$work/$placement.r" | median); sm=$(cut -d' ' -f2 < "$work/$placement.r" | median)
  echo "- $placement, medians: local $lm s ($(awk -v s="$size" -v t="$lm" 'BEGIN{printf "%.0f", s/t}') MiB/s of image), s3 $sm s ($(awk -v s="$size" -v t="$sm" 'BEGIN{printf "%.0f", s/t}') MiB/s): s3 at $(awk -v a="$lm" -v b="$sm" 'BEGIN{printf "%.0f", 100*a/b}')% of local"
done
echo "- peak RSS of the last backup to s3: $((full_rss / 1024)) MiB"
echo
repo="s3://bench/run$n"
changes="$work/changes.json"
changed=$(python3 "$here/mutate.py" "$work/mixed.img" 0.01 64 64 11 --changes "$changes")
read -r it _ ireq < <(timed "$bp" backup --repo "$repo" --vm v --disk "id=d,source=$work/mixed.img,cbt=changes:$changes")
read -r rt _ rreq < <(timed "$bp" restore --repo "$repo" v:latest --disk d --to "$work/restored.img")
cmp "$work/mixed.img" "$work/restored.img"
read -r ct _ creq < <(timed "$bp" check --repo "$repo" --read-data)
read -r st2 _ sreq2 < <(timed "$bp" snapshots --repo "$repo")
echo "| operation on s3:// | wall (s) | requests (PUT / multipart parts / GET / HEAD / LIST / DELETE) | MiB up / down |"
echo "|---|---|---|---|"
row() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
name, t, r = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(f"| {name} | {t} | {r.get('put',0)} / {r.get('multipart_part',0)} / {r.get('get',0)} / {r.get('head',0)} / {r.get('list',0)} / {r.get('delete',0)} | {r.get('bytes_up',0)/2**20:.0f} / {r.get('bytes_down',0)/2**20:.0f} |")
PY
}
row "full backup, $size MiB image" "$sm" "$full_req"
row "incremental, $(mib "$changed") MiB changed (change list)" "$it" "$ireq"
row "restore (bit-exact)" "$rt" "$rreq"
row "check --read-data" "$ct" "$creq"
row "snapshots (index and manifests cached)" "$st2" "$sreq2"
