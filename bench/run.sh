#!/usr/bin/env bash
# blockproof against restic and borg, side by side, on the same images in one run.
#
# usage: bench/run.sh [--size MIB] [--runs N] [--quick] [--no-docs]
#   --size MIB  size of the mixed image (default 2048)
#   --runs N    full backups of the mixed image per tool, each into a fresh repository;
#               the tables show the run of median wall time (default 3; --quick: 1)
#   --quick     512 MiB mixed image only, no borg-fixed, no ext4 image (< 3 minutes)
#   --no-docs   do not update docs/BENCHMARKS.md
#
# Installs what it needs when missing (restic, borgbackup, libnbd-bin, qemu-utils, time)
# with apt-get when run as root. Generates a deterministic mixed image (bench/gen_image.py)
# and, unless --quick, a real ext4 image populated from /usr/share; measures the machine's
# ceilings on the same data; then runs every tool on: full backup, incremental after 1%
# and after 5% of the image changed (scattered 64 KiB writes; blockproof with CBT from a
# change list and from its own qcow2 bitmaps, restic and borg re-reading the file), restore
# to a file, and a full read-back check. Records wall time, CPU time, peak RSS, bytes read
# from the source and bytes added to the repository, as Markdown (stdout and
# bench/results/latest.md) and JSON (bench/results/latest.json), and rewrites the "Side by
# side" section of docs/BENCHMARKS.md. Not part of CI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
size=2048
quick=0
docs=1
runs=
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --quick) quick=1; size=512; shift ;;
    --no-docs) docs=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

[ -n "$runs" ] || runs=$([ $quick = 1 ] && echo 1 || echo 3)

need=()
command -v restic >/dev/null || need+=(restic)
command -v borg >/dev/null || need+=(borgbackup)
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
command -v qemu-io >/dev/null || need+=(qemu-utils)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing ${need[*]} with apt-get (running as root)" >&2
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing: ${need[*]} (apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

(cd "$root" && cargo build --release -q && cargo build --release -q -p blockproof-repo --example ceilings)
bp="$root/target/release/blockproof"
work=$(mktemp -d /tmp/blockproof-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
results="$work/results.jsonl"
: > "$results"
export BLOCKPROOF_PASSWORD=bench RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export BORG_BASE_DIR="$work/borg-home" RESTIC_CACHE_DIR="$work/restic-cache"

repo_bytes() { du -sb "$1" | cut -f1; }

# measure IMAGE STEP TOOL REPO READ_BYTES -- command...
# Runs the command under GNU time with a warm page cache and records one JSON line.
measure() {
  local image=$1 step=$2 tool=$3 repo=$4 read=$5; shift 6
  cat "$work/$image.img" > /dev/null 2>&1 || true
  sync # the previous step's writeback must not be billed to this one
  local before=0
  [ -e "$repo" ] && before=$(repo_bytes "$repo")
  /usr/bin/time -f "%e %U %S %M" -o "$work/time" "$@" > "$work/out" 2> "$work/err" || {
    echo "FAILED: $tool $step: $*" >&2; cat "$work/err" >&2; exit 1; }
  read -r wall user sys rss < "$work/time"
  local after=0
  [ -e "$repo" ] && after=$(repo_bytes "$repo")
  if [ "$read" = report ]; then
    read=$(python3 -c "import json; print(json.load(open('$work/out'))['disks'][0]['bytes_read'])")
  fi
  python3 - "$image" "$step" "$tool" "$wall" "$user" "$sys" "$rss" "$read" "$before" "$after" >> "$results" <<'PY'
import json, sys
image, step, tool, wall, user, sys_, rss, read, before, after = sys.argv[1:]
print(json.dumps({"image": image, "step": step, "tool": tool, "wall_s": float(wall),
                  "cpu_s": round(float(user) + float(sys_), 2), "peak_rss_mib": round(int(rss) / 1024),
                  "read_mib": None if read == "-" else round(int(read) / 1048576, 1),
                  "added_mib": round((int(after) - int(before)) / 1048576, 1)}))
PY
  printf '  %-8s %-34s %6.2f s\n' "$tool" "$step" "$wall" >&2
}

tools=(blockproof restic borg)
[ $quick = 0 ] && tools+=(borg-fixed)

init_repos() { # NAME
  local n=$1
  "$bp" init --repo "$work/bp-$n" > /dev/null
  restic init --repo "$work/restic-$n" > /dev/null 2>&1
  borg init -e repokey-blake2 "$work/borg-$n" > /dev/null 2>&1
  [ $quick = 0 ] && borg init -e repokey-blake2 "$work/borgf-$n" > /dev/null 2>&1
  return 0
}

# backup_all IMAGE STEP [CBT...]: every tool backs up $work/IMAGE.img
backup_all() {
  local img=$1 step=$2 cbt=${3:-none}
  local file="$work/$img.img" bytes
  bytes=$(stat -c %s "$file")
  measure "$img" "$step" blockproof "$work/bp-$img" report -- \
    "$bp" backup --repo "$work/bp-$img" --vm bench --disk "id=d0,source=$file,cbt=$cbt" --json
  measure "$img" "$step" restic "$work/restic-$img" "$bytes" -- \
    restic -r "$work/restic-$img" backup --quiet "$file"
  local n; n=$(date +%s%N)
  measure "$img" "$step" borg "$work/borg-$img" "$bytes" -- \
    borg create --compression lz4 "$work/borg-$img::$n" "$file"
  if [ $quick = 0 ]; then
    measure "$img" "$step" borg-fixed "$work/borgf-$img" "$bytes" -- \
      borg create --compression lz4 --chunker-params fixed,65536 "$work/borgf-$img::$n" "$file"
  fi
}

restore_all() { # IMAGE
  local img=$1 out="$work/restore"
  rm -rf "$out"; mkdir -p "$out"
  measure "$img" "restore to a file" blockproof "$work/bp-$img" - -- \
    "$bp" restore --repo "$work/bp-$img" bench:latest --disk d0 --to "$out/bp.img"
  cmp "$work/$img.img" "$out/bp.img"
  echo "  blockproof restore: $(du -k "$out/bp.img" | cut -f1) KiB allocated of $(( $(stat -c %s "$out/bp.img") / 1024 )) KiB (sparse)" >&2
  rm -f "$out/bp.img"
  measure "$img" "restore to a file" restic "$work/restic-$img" - -- \
    restic -r "$work/restic-$img" restore latest --target "$out/restic"
  cmp "$work/$img.img" "$out/restic$work/$img.img"
  rm -rf "$out/restic"
  local last; last=$(borg list --short "$work/borg-$img" | tail -1)
  mkdir -p "$out/borg"
  measure "$img" "restore to a file" borg "$work/borg-$img" - -- \
    sh -c "cd '$out/borg' && borg extract '$work/borg-$img::$last'"
  cmp "$work/$img.img" "$out/borg$work/$img.img"
  rm -rf "$out/borg"
}

check_all() { # IMAGE
  local img=$1
  measure "$img" "check, reading all data" blockproof "$work/bp-$img" - -- \
    "$bp" check --repo "$work/bp-$img" --read-data
  measure "$img" "check, reading all data" restic "$work/restic-$img" - -- \
    restic -r "$work/restic-$img" check --read-data
  measure "$img" "check, reading all data" borg "$work/borg-$img" - -- \
    borg check --verify-data "$work/borg-$img"
}

echo "generating the mixed image ($size MiB)" >&2
python3 "$here/gen_image.py" "$work/mixed.img" "$size" 1 > /dev/null
qemu-img convert -f raw -O qcow2 "$work/mixed.img" "$work/mixed.qcow2"

echo "ceilings on the same data" >&2
cat "$work/mixed.img" > /dev/null
t0=$(date +%s.%N); cat "$work/mixed.img" > /dev/null; t1=$(date +%s.%N)
cat_rate=$(awk -v s="$size" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f", s*1.048576/(b-a)}')
head -c 268435456 "$work/mixed.img" > "$work/sample"
zstd_line=$(zstd -b1 -q "$work/sample" 2>&1 | tail -1 | tr -s ' ' || true)
ceilings=$("$root/target/release/examples/ceilings" "$work/mixed.img" 256)
rm -f "$work/sample"

"$bp" init --repo "$work/bp-qcow2" > /dev/null
for run in $(seq 1 "$runs"); do
  echo "mixed image: full backup (run $run of $runs)" >&2
  rm -rf "$work"/bp-mixed "$work"/restic-mixed "$work"/borg-mixed "$work"/borgf-mixed
  init_repos mixed
  backup_all mixed "full backup"
done
measure mixed "full backup (qcow2, bitmap:auto)" blockproof "$work/bp-qcow2" report -- \
  "$bp" backup --repo "$work/bp-qcow2" --vm bench --disk "id=d0,source=$work/mixed.qcow2,cbt=bitmap:auto" --json
for pct in 1 5; do
  frac=$(awk -v p=$pct 'BEGIN{print p/100}')
  changed=$(python3 "$here/mutate.py" "$work/mixed.img" "$frac" 64 64 $((10 + pct)) \
    --changes "$work/changes.json" --qcow2 "$work/mixed.qcow2")
  echo "$changed" > "$work/changed-$pct"
  echo "mixed image: $pct% changed ($changed bytes)" >&2
  backup_all mixed "incremental after $pct% changed" "changes:$work/changes.json"
  measure mixed "incremental after $pct% changed (qcow2, bitmap:auto)" blockproof "$work/bp-qcow2" report -- \
    "$bp" backup --repo "$work/bp-qcow2" --vm bench --disk "id=d0,source=$work/mixed.qcow2,cbt=bitmap:auto" --json
done
echo "mixed image: restore and check" >&2
restore_all mixed
check_all mixed

if [ $quick = 0 ]; then
  echo "ext4 image of /usr/share" >&2
  fs_mib=$(( ($(du -sm /usr/share | cut -f1) * 3 / 2 / 256 + 1) * 256 ))
  mkfs.ext4 -q -F -d /usr/share "$work/ext4.img" "${fs_mib}M"
  init_repos ext4
  backup_all ext4 "full backup"
  restore_all ext4
fi

python3 - "$results" "$work" "$size" "$cat_rate" "$zstd_line" "$ceilings" "$root" "$docs" "$quick" <<'PY'
import json, os, platform, subprocess, sys, datetime
results_path, work, size, cat_rate, zstd_line, ceilings, root, docs, quick = sys.argv[1:]
runs_all = [json.loads(l) for l in open(results_path)]
# A step measured several times (the full backup, --runs) is shown by its run of median
# wall time; every run stays in the JSON.
groups = {}
for r in runs_all:
    groups.setdefault((r["image"], r["step"], r["tool"]), []).append(r)
rows = []
for r in runs_all:
    g = groups[(r["image"], r["step"], r["tool"])]
    if g and r is g[0]:
        med = sorted(g, key=lambda x: x["wall_s"])[len(g) // 2]
        rows.append(dict(med, runs=len(g), walls=[x["wall_s"] for x in g]))
changed = {p: int(open(os.path.join(work, f"changed-{p}")).read()) for p in (1, 5)}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((int(l.split()[1]) // 1024 // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
vers = {
    "blockproof": subprocess.run([os.path.join(root, "target/release/blockproof"), "--version"], capture_output=True, text=True).stdout.strip(),
    "restic": subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.split(" compiled")[0],
    "borg": subprocess.run(["borg", "--version"], capture_output=True, text=True).stdout.strip(),
}
date = datetime.date.today().isoformat()
out = []
out.append(f"Run of `bench/run.sh{' --quick' if quick == '1' else ''}` on {date}: {os.cpu_count()} vCPUs ({cpu}), {mem} GiB RAM, "
           f"{platform.system()} {platform.release()}; {vers['blockproof']}, {vers['restic']}, {vers['borg']}. "
           f"Page cache warm before every step; GNU time. Full backups of the mixed image: run of median wall time of "
           f"{max(r['runs'] for r in rows)} per tool, each into a fresh repository (all runs' wall times below the table).")
out.append("")
out.append(f"Ceilings on the same data: page-cache read (`cat`) {cat_rate} MB/s; `zstd -b1`: {zstd_line}")
out.append("")
out.append("```")
out.append(ceilings)
out.append("```")
for image in ("mixed", "ext4"):
    rs = [r for r in rows if r["image"] == image]
    if not rs:
        continue
    title = f"Mixed image ({size} MiB)" if image == "mixed" else "ext4 image of /usr/share"
    out.append("")
    out.append(f"#### {title}")
    out.append("")
    out.append("| step | tool | wall (s) | CPU (s) | peak RSS (MiB) | read from source (MiB) | added to repository (MiB) |")
    out.append("|---|---|---|---|---|---|---|")
    for r in rs:
        read = "" if r["read_mib"] is None else r["read_mib"]
        added = r["added_mib"] if r["step"].startswith(("full", "incremental")) else ""
        out.append(f"| {r['step']} | {r['tool']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_mib']} | {read} | {added} |")
    multi = [r for r in rs if r["runs"] > 1]
    if multi:
        out.append("")
        out.append("Wall times of every run: " + "; ".join(
            f"{r['tool']} {', '.join(f'{w:.2f}' for w in r['walls'])} s" for r in multi) + ".")
    steps = []
    for r in rs:
        if r["tool"] == "restic" and r["step"] not in steps:
            steps.append(r["step"])
    out.append("")
    out.append("| step | blockproof faster than restic | than borg | blockproof added / changed bytes | restic | borg |")
    out.append("|---|---|---|---|---|---|")
    for st in steps:
        get = lambda t: next((x for x in rs if x["step"] == st and x["tool"] == t), None)
        b, r, g = get("blockproof"), get("restic"), get("borg")
        if not (b and r and g):
            continue
        ratio = lambda x: f"{x['wall_s'] / b['wall_s']:.1f}x"
        amp = ["", "", ""]
        for p in (1, 5):
            if st == f"incremental after {p}% changed":
                amp = [f"{x['added_mib'] * 1048576 / changed[p]:.2f}x" for x in (b, r, g)]
        out.append(f"| {st} | {ratio(r)} | {ratio(g)} | {amp[0]} | {amp[1]} | {amp[2]} |")
md = "\n".join(out)
os.makedirs(os.path.join(root, "bench/results"), exist_ok=True)
open(os.path.join(root, "bench/results/latest.md"), "w").write(md + "\n")
json.dump({"date": date, "size_mib": int(size), "quick": quick == "1", "versions": vers, "changed_bytes": changed,
           "rows": rows, "runs": runs_all}, open(os.path.join(root, "bench/results/latest.json"), "w"), indent=1)
print(md)
if docs == "1":
    path = os.path.join(root, "docs/BENCHMARKS.md")
    text = open(path).read()
    begin, end = "<!-- run.sh:begin -->", "<!-- run.sh:end -->"
    section = f"{begin}\n{md}\n{end}"
    if begin in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text += f"\n## Side by side: blockproof, restic and borg\n\n{section}\n"
    open(path, "w").write(text)
PY
