#!/usr/bin/env bash
# A one-chunk incremental of a large disk with data in every chunk (not sparse): what an
# unchanged part of a full disk costs. The disk is computed by an nbdkit plugin
# (bench/full_disk.c: unique, compressible chunks, about 14% of them zero), so it takes no
# space; it is backed up in full once through NBD, then a change list naming one chunk
# drives --runs one-chunk incrementals (--verify none), each measured with GNU time, and
# the zero-chunk count of each is compared with the full backup's. Markdown on stdout.
#
# usage: bench/full_disk.sh [--gib 80] [--runs 5] [--work DIR]
#   --work DIR  scratch directory (default /dev/shm/blockproof-full-disk; the repository
#               takes about 6 MB per GiB of disk), removed at the end
#
# Needs: nbdkit and its plugin header (nbdkit, nbdkit-plugin-dev), gcc, GNU time; installs
# them with apt-get when run as root. Not part of CI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
gib=80
runs=5
work=/dev/shm/blockproof-full-disk
while [ $# -gt 0 ]; do
  case $1 in
    --gib) gib=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

need=()
[ -x /usr/bin/time ] || need+=(time)
command -v nbdkit >/dev/null || need+=(nbdkit)
[ -f /usr/include/nbdkit-plugin.h ] || need+=(nbdkit-plugin-dev)
command -v gcc >/dev/null || need+=(gcc)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing: ${need[*]} (apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

(cd "$root" && cargo build --release -q -p blockproof)
bp="$root/target/release/blockproof"
export BLOCKPROOF_PASSWORD=bench BLOCKPROOF_CACHE_DIR="$work/cache"
rm -rf "$work" && mkdir -p "$work"
nbd_pid=
cleanup() {
  [ -z "$nbd_pid" ] || kill "$nbd_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

gcc -O2 -shared -fPIC -o "$work/full_disk.so" "$here/full_disk.c"
FULL_DISK_GIB=$gib nbdkit -f -U "$work/nbd.sock" "$work/full_disk.so" &
nbd_pid=$!
for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
[ -S "$work/nbd.sock" ] || { echo "nbdkit did not start" >&2; exit 1; }
source="nbd+unix:///?socket=$work/nbd.sock"
bytes=$((gib << 30))
middle=$((bytes / 65536 / 2 + 1))
printf '{"startOffset": 0, "length": %s, "changedArea": [{"start": %s, "length": 65536}]}\n' \
  "$bytes" $((middle * 65536)) > "$work/changes.json"

# field FILE NAME: a field of the first disk of a --json report.
field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["disks"][0][sys.argv[2]])' "$1" "$2"; }
# timed LABEL CMD...: runs CMD (its report in $work/out), prints a table row.
timed() {
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" > "$work/out" 2> "$work/err" || { cat "$work/err" >&2; exit 1; }
  read -r wall kb < "$work/time"
  echo "| $label | $wall | $((kb / 1024)) MiB | $(field "$work/out" mode) | $(field "$work/out" bytes_read) | $(field "$work/out" zero_chunks) |"
}

"$bp" init --repo "$work/repo" --kdf-memory 1 --kdf-iterations 1 > /dev/null
echo "## A one-chunk incremental of a full $gib GiB disk ($(git -C "$root" rev-parse --short HEAD))"
echo
echo "| run | wall (s) | peak RSS | mode | bytes read | zero chunks |"
echo "|---|---|---|---|---|---|"
timed "full backup" "$bp" backup --repo "$work/repo" --vm full --verify none --json --disk "id=d0,source=$source"
zeros=$(field "$work/out" zero_chunks)
for r in $(seq "$runs"); do
  timed "one-chunk incremental $r" "$bp" backup --repo "$work/repo" --vm full --verify none --json \
    --disk "id=d0,source=$source,cbt=changes:$work/changes.json"
  [ "$(field "$work/out" mode)" = incremental ] || { echo "run $r was not incremental" >&2; exit 1; }
  [ "$(field "$work/out" zero_chunks)" = "$zeros" ] || { echo "run $r counted other zero chunks than the full backup" >&2; exit 1; }
done
echo
echo "Repository: $(du -sh "$work/repo" | cut -f1)."
