#!/usr/bin/env bash
# Incremental backups with changed-block tracking on a qcow2 image: a full backup with
# cbt=bitmap:auto, then 1% of the image rewritten by qemu-io in scattered 64 KiB writes of random data,
# then the incremental (blockproof exports its own dirty bitmap through qemu-nbd, and
# verifies the default 5% sample of the unchanged chunks against the source), then the
# same change as a VMware-style change list on the raw image (cbt=changes:FILE).
# Wall time, CPU time, peak RSS, bytes read and bytes added. Prints a Markdown table.
#
# usage: bench/cbt.sh [SIZE_MIB=2048] [WORKDIR=/tmp/blockproof-cbt-bench]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
size=${1:-2048}
work=${2:-/tmp/blockproof-cbt-bench}
bin="$here/../target/release/blockproof"
(cd "$here/.." && cargo build --release -q)
export BLOCKPROOF_PASSWORD=bench
rm -rf "$work" && mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
python3 "$here/gen_image.py" "$work/disk.img" "$size" 1 >/dev/null
qemu-img convert -f raw -O qcow2 "$work/disk.img" "$work/disk.qcow2"
repo_bytes() { find "$1" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }
run() { # label, json-out, command...
  local label=$1 out=$2; shift 2
  /usr/bin/time -f "%e %U %S %M" -o "$work/time" "$@" --json > "$out"
  read -r wall user sys rss < "$work/time"
  local read_b ver_b
  read_b=$(python3 -c "import json,sys; print(json.load(open('$out'))['disks'][0]['bytes_read'])")
  ver_b=$(python3 -c "import json,sys; print(json.load(open('$out'))['disks'][0]['verified_bytes'])")
  printf '| %s | %.2f | %.2f | %.0f MiB | %s MiB | %s MiB |' "$label" "$wall" "$(awk "BEGIN{print $user+$sys}")" \
    "$(awk "BEGIN{print $rss/1024}")" "$(awk "BEGIN{printf \"%.1f\", $read_b/1048576}")" \
    "$(awk "BEGIN{printf \"%.1f\", $ver_b/1048576}")"
}
# 1% of the image in 64 KiB writes at 64 KiB-aligned random offsets (seeded).
writes=$(python3 - "$size" <<'PY'
import random, sys
size = int(sys.argv[1]) << 20
rng = random.Random(7)
n = size // 100 // 65536
offs = sorted(rng.sample(range(size // 65536), n))
print(" ".join(str(o * 65536) for o in offs))
PY
)
"$bin" init --repo "$work/repo" >/dev/null
"$bin" init --repo "$work/repo-raw" >/dev/null
echo "| step ($size MiB image) | wall (s) | CPU (s) | peak RSS | read to back up | read to verify (default 5%) | added to repository |"
echo "|---|---|---|---|---|---|---|"
cat "$work/disk.qcow2" > /dev/null
before=$(repo_bytes "$work/repo")
run "full, qcow2, cbt=bitmap:auto" "$work/r1.json" "$bin" backup --repo "$work/repo" --vm bench \
  --disk "id=d0,source=$work/disk.qcow2,cbt=bitmap:auto"
echo " $(( ($(repo_bytes "$work/repo") - before) / 1048576 )) MiB |"
"$bin" backup --repo "$work/repo-raw" --vm bench --disk "id=d0,source=$work/disk.img" > /dev/null
args=(-f qcow2)
changes='{"startOffset": 0, "length": '$((size << 20))', "changedArea": ['
sep=
i=0
mkdir -p "$work/data"
python3 -c "
import os, random, sys
rng = random.Random(11)
for i in range(int(sys.argv[1])):
    open(os.path.join(sys.argv[2], str(i)), 'wb').write(rng.randbytes(65536))
" "$(echo $writes | wc -w)" "$work/data"
for off in $writes; do
  args+=(-c "write -s $work/data/$i $off 65536")
  changes+="$sep{\"start\": $off, \"length\": 65536}"
  sep=,
  i=$((i + 1))
done
changes+=']}'
echo "$changes" > "$work/changes.json"
qemu-io "${args[@]}" "$work/disk.qcow2" > /dev/null
qemu-img convert -f qcow2 -O raw "$work/disk.qcow2" "$work/disk.img"
changed=$((i * 65536))
cat "$work/disk.qcow2" "$work/disk.img" > /dev/null
before=$(repo_bytes "$work/repo")
run "incremental after 1% changed, cbt=bitmap:auto" "$work/r2.json" "$bin" backup --repo "$work/repo" --vm bench \
  --disk "id=d0,source=$work/disk.qcow2,cbt=bitmap:auto"
added=$(( $(repo_bytes "$work/repo") - before ))
echo " $(awk "BEGIN{printf \"%.1f\", $added/1048576}") MiB |"
before=$(repo_bytes "$work/repo-raw")
run "incremental after 1% changed, raw, cbt=changes:FILE" "$work/r3.json" "$bin" backup --repo "$work/repo-raw" --vm bench \
  --disk "id=d0,source=$work/disk.img,cbt=changes:$work/changes.json"
added_raw=$(( $(repo_bytes "$work/repo-raw") - before ))
echo " $(awk "BEGIN{printf \"%.1f\", $added_raw/1048576}") MiB |"
"$bin" restore --repo "$work/repo" bench:latest --disk d0 --to "$work/restored.img" > /dev/null
cmp "$work/disk.img" "$work/restored.img"
echo
echo "changed: $i writes of 64 KiB = $((changed / 1048576)) MiB of random data;"
echo "added by the bitmap:auto incremental: $(awk "BEGIN{printf \"%.2f\", $added/$changed}")x the changed bytes;"
echo "the restored incremental equals the image (cmp)."
