#!/usr/bin/env bash
# Scale: what the commands cost as the repository grows (blobs) and as a disk grows
# (chunks). Peak RSS and wall time of each step (GNU time), as Markdown on stdout.
#
# usage: bench/scale.sh [--blobs "1000000 10000000"] [--disks "64G 1T 4T"] [--work DIR] [--no-cache]
#   --no-cache  load the blob index into memory (no local cache), as before the cache
#   --skip "check gc"  leave out those steps (they look up every blob: at 100 M blobs
#               they take tens of minutes)
#   --work DIR  scratch directory (default /tmp/blockproof-scale), removed at the end
#               unless SCALE_KEEP=1 is set (the last repository of each kind stays)
#
# Per size N of --blobs: a fresh directory repository (Argon2id 1 MiB, 1 pass, so the key
# derivation is not what is measured), a full backup of a small real vm (`small`, a 64 MiB
# mixed image from bench/gen_image.py), then N synthetic blobs added by the
# blockproof-repo example `synthetic_repo` (index files in the real format, sparse packs
# of the right size, one snapshot of vm `synthetic` referencing every synthetic blob; see
# its doc). The blob index's local cache lives in DIR/cache: the first command after the
# generation (a restore of `small`) builds it, measured apart as "cold"; the steps after
# use it warm. Measured on it: a one-chunk incremental of `small` (a change list naming the
# one 64 KiB chunk rewritten), `snapshots`, restoring `small` (compared with the image),
# `check` (structure), `gc` (marks every blob, deletes nothing) and `copy` of
# small:latest into a fresh repository.
#
# Per size S of --disks: a sparse raw disk (`truncate -s S`) in a fresh repository; a full
# backup read through qemu-nbd (block status: the holes are not read), then one 64 KiB
# chunk in the middle rewritten and a one-chunk incremental of the raw file itself with a
# change list (cbt=changes:FILE) and --verify none (the default 5% sample would read 5% of
# the holes). Both are measured. ext4 refuses files of 16 TiB and more: for such sizes put
# --work on another file system (tmpfs, e.g. /dev/shm/NAME, holds the holes for free).
#
# Needs: GNU time (package `time`), qemu-nbd (qemu-utils), python3; installs the first
# two with apt-get when run as root. Disk: about 90 bytes per blob (index files and tree
# pages; the packs are sparse) and 55 more for the cache (twice that while it is built).
# Memory: with the cache, a few bytes per blob; with --no-cache about 55 bytes per blob for
# every step but `snapshots` (10 M blobs: ~540 MiB). Not part of CI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
blobs_list="1000000 10000000"
disks="64G 1T 4T"
work=/tmp/blockproof-scale
skip=
while [ $# -gt 0 ]; do
  case $1 in
    --blobs) blobs_list=$2; shift 2 ;;
    --disks) disks=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --no-cache) export BLOCKPROOF_NO_CACHE=1; shift ;;
    --skip) skip=" $2 "; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

need=()
[ -x /usr/bin/time ] || need+=(time)
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing: ${need[*]} (apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

(cd "$root" && cargo build --release -q -p blockproof && cargo build --release -q -p blockproof-repo --example synthetic_repo)
bp="$root/target/release/blockproof"
gen="$root/target/release/examples/synthetic_repo"
export BLOCKPROOF_PASSWORD=bench BLOCKPROOF_TO_PASSWORD=bench BLOCKPROOF_CACHE_DIR="$work/cache"
cheap=(--kdf-memory 1 --kdf-iterations 1)
rm -rf "$work" && mkdir -p "$work"
nbd_pid=
cleanup() {
  [ -z "$nbd_pid" ] || kill "$nbd_pid" 2>/dev/null || true
  rm -rf "$work"
}
if [ -n "${SCALE_KEEP:-}" ]; then
  trap '[ -z "$nbd_pid" ] || kill "$nbd_pid" 2>/dev/null || true' EXIT
else
  trap cleanup EXIT
fi

mib() { awk "BEGIN{printf \"%.0f\", $1/1024}"; }
# row LABEL command...: runs it under GNU time, prints "| LABEL | wall | peak RSS |".
row() {
  local label=$1; shift
  sync
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" > "$work/out" 2> "$work/err" || {
    echo "FAILED: $label: $*" >&2; cat "$work/err" "$work/out" >&2; exit 1; }
  read -r wall rss < "$work/time"
  echo "| $label | $wall | $(mib "$rss") MiB |"
}
# changes FILE SIZE OFFSET: a change list naming one 64 KiB chunk.
changes() {
  printf '{"startOffset": 0, "length": %s, "changedArea": [{"start": %s, "length": 65536}]}\n' "$2" "$3" > "$1"
}
# expect MODE BYTES_READ: the last backup's --json report (in $work/out) read its disk
# that way and that much.
expect() {
  python3 - "$work/out" "$1" "$2" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["disks"][0]
if (d["mode"], d["bytes_read"]) != (sys.argv[2], int(sys.argv[3])):
    sys.exit(f"expected a {sys.argv[2]} backup reading {sys.argv[3]} bytes, got {d['mode']} reading {d['bytes_read']}")
PY
}

echo "## Repository size (blobs)"
echo
python3 "$here/gen_image.py" "$work/small.orig" 64 1 > /dev/null
for n in $blobs_list; do
  repo="$work/repo-$n"
  rm -rf "$work"/repo-* "$work/copy" "$work/cache"
  cp "$work/small.orig" "$work/small.img"
  "$bp" init --repo "$repo" "${cheap[@]}" > /dev/null
  "$bp" backup --repo "$repo" --vm small --disk "id=d0,source=$work/small.img" > /dev/null
  gen_out=$("$gen" "$repo" "$n")
  gen_s=$(echo "$gen_out" | awk '{for (i = 1; i < NF; i++) if ($(i + 1) == "s") print $i}')
  echo "### $n synthetic blobs"
  echo
  echo "Generated in $gen_s s; repository on disk: $(du -sh "$repo" | cut -f1) ($(du -sh --apparent-size "$repo" | cut -f1) apparent)."
  echo
  echo "| step | wall (s) | peak RSS |"
  echo "|---|---|---|"
  row "restore small:latest (64 MiB), cold: builds the index cache" "$bp" restore --repo "$repo" small:latest --disk d0 --to "$work/restored.img"
  cmp "$work/small.img" "$work/restored.img"
  rm -f "$work/restored.img"
  # Rewrite one chunk (1 MiB in) and back it up with a change list naming it.
  dd if=/dev/urandom of="$work/small.img" bs=65536 count=1 seek=16 conv=notrunc status=none
  changes "$work/changes.json" $((64 << 20)) $((16 * 65536))
  row "one-chunk incremental backup" "$bp" backup --repo "$repo" --vm small --json \
    --disk "id=d0,source=$work/small.img,cbt=changes:$work/changes.json"
  expect incremental 65536
  row "snapshots" "$bp" snapshots --repo "$repo"
  row "restore small:latest (64 MiB)" "$bp" restore --repo "$repo" small:latest --disk d0 --to "$work/restored.img"
  cmp "$work/small.img" "$work/restored.img"
  rm -f "$work/restored.img"
  [[ $skip == *" check "* ]] || row "check (structure)" "$bp" check --repo "$repo"
  [[ $skip == *" gc "* ]] || row "gc" "$bp" gc --repo "$repo"
  "$bp" init --repo "$work/copy" "${cheap[@]}" > /dev/null
  row "copy small:latest to a new repository" "$bp" copy --repo "$repo" --to "$work/copy" small:latest
  echo
done

echo "## Disk size (chunks): a sparse raw disk"
echo
echo "| disk | chunks | full backup through qemu-nbd (s) | peak RSS | one-chunk incremental, raw file (s) | peak RSS |"
echo "|---|---|---|---|---|---|"
for s in $disks; do
  repo="$work/sparse-repo"
  rm -rf "$repo" "$work/sparse.raw"
  "$bp" init --repo "$repo" "${cheap[@]}" > /dev/null
  truncate -s "$s" "$work/sparse.raw"
  bytes=$(stat -c %s "$work/sparse.raw")
  chunks=$((bytes / 65536))
  qemu-nbd -f raw --read-only --persistent --shared=8 -k "$work/nbd.sock" "$work/sparse.raw" &
  nbd_pid=$!
  for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
  full=$(row "full" "$bp" backup --repo "$repo" --vm sparse --json \
    --disk "id=d0,source=nbd+unix:///?socket=$work/nbd.sock")
  expect full 0
  kill "$nbd_pid" && wait "$nbd_pid" 2>/dev/null || true
  nbd_pid=
  rm -f "$work/nbd.sock"
  middle=$((chunks / 2))
  dd if=/dev/urandom of="$work/sparse.raw" bs=65536 count=1 seek=$middle conv=notrunc status=none
  changes "$work/changes.json" "$bytes" $((middle * 65536))
  incr=$(row "incremental" "$bp" backup --repo "$repo" --vm sparse --verify none --json \
    --disk "id=d0,source=$work/sparse.raw,cbt=changes:$work/changes.json")
  expect incremental 65536
  full_cols=$(echo "$full" | cut -d'|' -f3,4)
  incr_cols=$(echo "$incr" | cut -d'|' -f3,4)
  echo "| $s | $chunks |$full_cols|$incr_cols|"
done
