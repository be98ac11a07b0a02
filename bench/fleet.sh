#!/usr/bin/env bash
# A fleet job's own overhead: `blockproof run` over N vms (one raw disk each, change lists
# for the incrementals), two at a time, with retention (keep_last 2), gc and the reports
# (JSON, HTML, Prometheus). Run 1 reads every disk in full; runs 2 and 3 follow 1% of
# each disk rewritten (scattered 64 KiB writes, as a change list). The overhead is the
# run's wall time outside the backups phase (retention, gc, copy, reading the
# repository's state, writing the reports), from the run report's `phases`; `rest` is
# what no phase counts: starting, opening the repository (the key derivation), the reports.
# Prints a Markdown table.
#
# usage: bench/fleet.sh [VMS=20] [SIZE_MIB=128] [WORKDIR=/tmp/blockproof-fleet-bench]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
vms=${1:-20}
size=${2:-128}
work=${3:-/tmp/blockproof-fleet-bench}
bin="$here/../target/release/blockproof"
(cd "$here/.." && cargo build --release -q)
export BLOCKPROOF_PASSWORD=bench
rm -rf "$work" && mkdir -p "$work/img" "$work/reports"
trap 'rm -rf "$work"' EXIT
"$bin" init --repo "$work/repo" >/dev/null
job="$work/job.toml"
{
  echo 'version = 1'
  echo 'name = "bench"'
  echo "[repository]"
  echo "location = \"$work/repo\""
  echo '[run]'
  echo 'parallel = 2'
  echo '[reports]'
  echo "directory = \"$work/reports\""
  echo "metrics = \"$work/reports/blockproof.prom\""
  echo '[gc]'
  echo 'every = "1s"'
  echo '[defaults]'
  echo 'verify = "5%"'
  echo 'retention = { keep_last = 2 }'
} > "$job"
for i in $(seq 1 "$vms"); do
  python3 "$here/gen_image.py" "$work/img/vm$i.img" "$size" "$i" >/dev/null
  printf '{"startOffset": 0, "length": %d, "changedArea": []}\n' $((size << 20)) > "$work/img/vm$i.json"
  {
    echo '[[vm]]'
    echo "name = \"vm$i\""
    echo "disks = [\"id=d,source=$work/img/vm$i.img,cbt=changes:$work/img/vm$i.json\"]"
  } >> "$job"
done

echo "| run | vms | wall (s) | backups (s) | retention (s) | gc (s) | state (s) | rest (s) | overhead | overhead share |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for run in 1 2 3; do
  if [ "$run" -gt 1 ]; then
    for i in $(seq 1 "$vms"); do
      python3 "$here/mutate.py" "$work/img/vm$i.img" 0.01 64 64 $((run * 100 + i)) \
        --changes "$work/img/vm$i.json" >/dev/null
    done
  fi
  start=$(date +%s.%N)
  "$bin" run "$job" --json > "$work/run$run.json"
  end=$(date +%s.%N)
  python3 - "$work/run$run.json" "$run" "$vms" "$start" "$end" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
run, vms, start, end = sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
wall = end - start
backups = r["phases"]["backups_seconds"]
over = wall - backups
assert r["status"] == "ok", r["status"]
p = r["phases"]
rest = wall - backups - p["retention_seconds"] - p["gc_seconds"] - p["copy_seconds"] - p["inventory_seconds"]
print(f"| {run} | {vms} | {wall:.2f} | {backups:.2f} | {p['retention_seconds']:.2f} | {p['gc_seconds']:.2f} "
      f"| {p['inventory_seconds']:.2f} | {rest:.2f} | {over:.2f} s | {over / wall * 100:.1f}% |")
PY
done
