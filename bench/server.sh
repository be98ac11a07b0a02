#!/usr/bin/env bash
# blockproof to a local directory against blockproof through a repository server on
# loopback (HTTPS, the certificate pinned), on the same mixed image in one run: a full
# backup and a restore each way (the >= 80% throughput aim of docs/SERVER.md), then three
# clients backing up three images at once, each way.
#
# usage: bench/server.sh [--size MIB] [--runs N]   (default 1024 MiB, 3 runs of each)
#   BP=PATH uses that binary instead of building a release one.
# Prints Markdown; not part of CI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
size=1024
runs=3
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [ -z "${BP:-}" ]; then
  (cd "$root" && cargo build --release -q -p blockproof)
  BP="$root/target/release/blockproof"
fi
work=$(mktemp -d /tmp/blockproof-serverbench.XXXXXX)
server_pid=
trap '[ -n "$server_pid" ] && kill $server_pid 2>/dev/null; rm -rf "$work"' EXIT
export BLOCKPROOF_PASSWORD=bench BLOCKPROOF_CACHE_DIR="$work/cache"
for i in 0 1 2 3; do python3 "$here/gen_image.py" "$work/img$i" "$size" "$((i + 1))" >/dev/null; done
cat "$work"/img* > /dev/null

secs() { /usr/bin/time -f "%e" -o "$work/time" "$@" > /dev/null 2> "$work/err" || { cat "$work/err" >&2; exit 1; }; cat "$work/time"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
rate() { awk -v s="$1" -v m="$2" 'BEGIN {printf "%.0f", m/s}'; }

start_server() {
  "$BP" server serve --state "$work/state" --listen 127.0.0.1:0 --serve main="$work/srv" > "$work/serve.out" 2> "$work/serve.err" &
  server_pid=$!
  for _ in $(seq 100); do [ -s "$work/serve.out" ] && grep -q certificate "$work/serve.out" && break; sleep 0.1; done
  url=$(sed -n 's/^serving //p' "$work/serve.out")
  export BLOCKPROOF_SERVER_FINGERPRINT=$(sed -n 's/^certificate //p' "$work/serve.out")
}
"$BP" server token create --state "$work/state" --name admin --role admin > "$work/admin.token" 2>/dev/null
"$BP" server token create --state "$work/state" --name host --role backup > "$work/backup.token" 2>/dev/null
for i in 1 2 3; do "$BP" server token create --state "$work/state" --name "host$i" --role backup > "$work/backup$i.token" 2>/dev/null; done
"$BP" server token create --state "$work/state" --name reader --role restore > "$work/restore.token" 2>/dev/null

fresh_dir() { rm -rf "$work/dir" "$work/cache"; "$BP" init --repo "$work/dir" --kdf-memory 8 --kdf-iterations 1 >/dev/null 2>&1; }
fresh_srv() {
  [ -n "$server_pid" ] && { kill $server_pid; wait $server_pid 2>/dev/null || true; server_pid=; }
  rm -rf "$work/srv" "$work/cache" "$work/state/trash" "$work/state/owners"
  start_server
  BLOCKPROOF_TOKEN=$(cat "$work/admin.token") "$BP" init --repo "$url" --kdf-memory 8 --kdf-iterations 1 >/dev/null 2>&1
}
disk() { echo "id=d,source=$work/img$1"; }

declare -A t
for run in $(seq "$runs"); do
  fresh_dir
  t[dir_backup]+="$(secs "$BP" backup --repo "$work/dir" --vm vm --disk "$(disk 0)") "
  t[dir_restore]+="$(secs "$BP" restore --repo "$work/dir" vm:latest --disk d --to "$work/out.raw") "
  rm -f "$work/out.raw"
  fresh_srv
  t[srv_backup]+="$(BLOCKPROOF_TOKEN=$(cat "$work/backup.token") secs "$BP" backup --repo "$url" --vm vm --disk "$(disk 0)") "
  rm -rf "$work/cache"
  t[srv_restore]+="$(BLOCKPROOF_TOKEN=$(cat "$work/restore.token") secs "$BP" restore --repo "$url" vm:latest --disk d --to "$work/out.raw") "
  cmp "$work/out.raw" "$work/img0"
  rm -f "$work/out.raw"
  # Three clients at once (three vms, three images), each way.
  fresh_dir
  s=$(date +%s.%N)
  pids=()
  for i in 1 2 3; do "$BP" backup --repo "$work/dir" --vm "vm$i" --disk "$(disk $i)" >/dev/null 2>&1 & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
  t[dir_three]+="$(awk -v s="$s" -v e="$(date +%s.%N)" 'BEGIN {printf "%.2f", e-s}') "
  fresh_srv
  s=$(date +%s.%N)
  pids=()
  for i in 1 2 3; do BLOCKPROOF_TOKEN=$(cat "$work/backup$i.token") "$BP" backup --repo "$url" --vm "vm$i" --disk "$(disk $i)" >/dev/null 2>&1 & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
  t[srv_three]+="$(awk -v s="$s" -v e="$(date +%s.%N)" 'BEGIN {printf "%.2f", e-s}') "
done

med() { echo "${t[$1]}" | tr ' ' '\n' | grep . | median; }
echo "| operation ($size MiB mixed image, median of $runs) | directory (s) | MiB/s | server (s) | MiB/s | server / directory |"
echo "|---|---|---|---|---|---|"
for op in backup restore; do
  d=$(med "dir_$op"); s=$(med "srv_$op")
  echo "| full $op | $d | $(rate "$d" "$size") | $s | $(rate "$s" "$size") | $(awk -v d="$d" -v s="$s" 'BEGIN {printf "%.0f%%", 100*d/s}') |"
done
d=$(med dir_three); s=$(med srv_three)
echo "| three full backups at once (3 x $size MiB) | $d | $(rate "$d" $((3 * size))) | $s | $(rate "$s" $((3 * size))) | $(awk -v d="$d" -v s="$s" 'BEGIN {printf "%.0f%%", 100*d/s}') |"
echo
echo "runs: dir backup ${t[dir_backup]}; srv backup ${t[srv_backup]}; dir restore ${t[dir_restore]}; srv restore ${t[srv_restore]}; dir three ${t[dir_three]}; srv three ${t[srv_three]}"
