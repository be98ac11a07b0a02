#!/usr/bin/env bash
# The orchestration overhead of backing up a running VM (`--from qmp:`): a QEMU VM (no
# guest OS; KVM where /dev/kvm opens, else TCG) with one qcow2 disk, a full backup, 1% of
# the disk rewritten through QEMU's block layer (HMP qemu-io on the disk node; the device
# shares writes, share-rw=on, so the dirty bitmap sees it), then the incremental end to end: set-up of the point-in-time view, read, verify 5%
# (the default), teardown and bitmap rotation. Against the same incremental of a plain
# export of a copy of the disk with the same writes: qemu-nbd serving the image with a
# persistent bitmap the script manages (`cbt=bitmap:NAME`), and blockproof's own
# `cbt=bitmap:auto` on the image file. RUNS runs each; prints the wall times, their
# medians and the difference. Release build.
#
# usage: bench/live_vm.sh [SIZE_MIB=1024] [RUNS=3] [WORKDIR=/tmp/blockproof-live-bench]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
size=${1:-1024}
runs=${2:-3}
work=${3:-/tmp/blockproof-live-bench}
bin="$here/../target/release/blockproof"
(cd "$here/.." && cargo build --release -q)
export BLOCKPROOF_PASSWORD=bench
rm -rf "$work" && mkdir -p "$work"
qemu_pid=
nbd_pid=
cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null || true
  [ -n "$nbd_pid" ] && kill "$nbd_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
python3 "$here/gen_image.py" "$work/disk.img" "$size" 1 >/dev/null
qemu-img convert -f raw -O qcow2 "$work/disk.img" "$work/vm.qcow2"
rm "$work/disk.img"
cp "$work/vm.qcow2" "$work/plain.qcow2"
cp "$work/vm.qcow2" "$work/auto.qcow2"

accel=tcg
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then accel=kvm; fi
qemu-system-x86_64 -machine pc,accel=$accel -m 128 -display none -nodefaults \
  -blockdev "driver=file,filename=$work/vm.qcow2,node-name=sys-file" \
  -blockdev driver=qcow2,file=sys-file,node-name=sys -device virtio-blk-pci,drive=sys,id=vd0,share-rw=on \
  -qmp "unix:$work/vm.qmp,server=on,wait=off" >/dev/null 2>&1 &
qemu_pid=$!
for _ in $(seq 100); do [ -S "$work/vm.qmp" ] && break; sleep 0.1; done

# One QMP command on the VM's monitor.
qmp() {
  python3 - "$work/vm.qmp" "$1" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
for cmd in ({"execute": "qmp_capabilities"}, json.loads(sys.argv[2])):
    f.write(json.dumps(cmd) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "event" not in r:
            break
    if "error" in r:
        sys.exit(f"QMP: {r['error']}")
# HMP answers in text: qemu-io's report goes to QEMU's output, an error comes back here.
if "human-monitor-command" in sys.argv[2] and r["return"].strip() and "wrote" not in r["return"]:
    sys.exit(f"HMP: {r['return']}")
PY
}
# 1% of the disk in 64 KiB writes at random 64 KiB-aligned offsets (seeded per run).
offsets() {
  python3 - "$size" "$1" <<'PY'
import random, sys
size = int(sys.argv[1]) << 20
rng = random.Random(int(sys.argv[2]))
print(" ".join(str(o * 65536) for o in sorted(rng.sample(range(size // 65536), size // 100 // 65536))))
PY
}
# The same writes into the VM (through its block layer) and into an image file.
write_vm() {
  local i=0
  for off in $1; do
    qmp "{\"execute\": \"human-monitor-command\", \"arguments\": {\"command-line\": \"qemu-io sys \\\"write -P $((i % 250 + 1)) $off 65536\\\"\"}}"
    i=$((i + 1))
  done
}
write_file() {
  local i=0 args=()
  for off in $1; do
    args+=(-c "write -P $((i % 250 + 1)) $off 65536")
    i=$((i + 1))
  done
  qemu-io -f qcow2 "${args[@]}" "$2" >/dev/null
}
timed() { # json-out, command... -> prints "wall core"
  local out=$1
  shift
  /usr/bin/time -f "%e" -o "$work/time" "$@" --json >"$out"
  printf '%s %s\n' "$(cat "$work/time")" "$(python3 -c "import json; print(round(json.load(open('$out'))['duration_seconds'], 2))")"
}
serve_plain() {
  qemu-nbd -r -t -f qcow2 -k "$work/plain.sock" -B bm "$work/plain.qcow2" &
  nbd_pid=$!
  for _ in $(seq 100); do [ -S "$work/plain.sock" ] && break; sleep 0.05; done
}
stop_plain() { kill "$nbd_pid"; wait "$nbd_pid" 2>/dev/null || true; nbd_pid=; rm -f "$work/plain.sock"; }

for r in vm plain auto; do "$bin" init --repo "$work/repo-$r" --json >/dev/null; done
live=(--from "qmp:$work/vm.qmp" --state-dir "$work/state")
"$bin" backup --repo "$work/repo-vm" --vm bench "${live[@]}" >/dev/null
qemu-img bitmap --add "$work/plain.qcow2" bm
serve_plain
"$bin" backup --repo "$work/repo-plain" --vm bench \
  --disk "id=sys,source=nbd+unix:///?socket=$work/plain.sock,cbt=bitmap:bm" >/dev/null
stop_plain
"$bin" backup --repo "$work/repo-auto" --vm bench --disk "id=sys,source=$work/auto.qcow2,cbt=bitmap:auto" >/dev/null

echo "| run | running VM, --from qmp: wall (s) | backup core (s) | plain export, cbt=bitmap:NAME: wall (s) | backup core (s) | image file, cbt=bitmap:auto: wall (s) | backup core (s) |"
echo "|---|---|---|---|---|---|---|"
: >"$work/rows"
for run in $(seq "$runs"); do
  offs=$(offsets "$run")
  write_vm "$offs"
  write_file "$offs" "$work/plain.qcow2"
  write_file "$offs" "$work/auto.qcow2"
  sync
  vm=$(timed "$work/vm.json" "$bin" backup --repo "$work/repo-vm" --vm bench "${live[@]}")
  # The plain export: the bitmap since the last backup, cleared afterwards by the script.
  serve_plain
  plain=$(timed "$work/plain.json" "$bin" backup --repo "$work/repo-plain" --vm bench \
    --disk "id=sys,source=nbd+unix:///?socket=$work/plain.sock,cbt=bitmap:bm")
  stop_plain
  qemu-img bitmap --clear "$work/plain.qcow2" bm
  auto=$(timed "$work/auto.json" "$bin" backup --repo "$work/repo-auto" --vm bench \
    --disk "id=sys,source=$work/auto.qcow2,cbt=bitmap:auto")
  for j in vm plain auto; do
    python3 -c "
import json, sys
d = json.load(open('$work/$j.json'))['disks'][0]
assert d['mode'] == 'incremental' and d['cbt_reported_chunks'] >= $(echo "$offs" | wc -w), d
" || { echo "run $run: $j was not the expected incremental" >&2; exit 1; }
  done
  echo "| $run | ${vm% *} | ${vm#* } | ${plain% *} | ${plain#* } | ${auto% *} | ${auto#* } |"
  echo "$vm $plain $auto" >>"$work/rows"
done
python3 - "$work/rows" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1])]
med = [statistics.median(c) for c in zip(*rows)]
print(f"| median | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | {med[3]:.2f} | {med[4]:.2f} | {med[5]:.2f} |")
print()
print(f"orchestration overhead (median wall, running VM minus plain export): {med[0] - med[2]:+.2f} s; "
      f"minus bitmap:auto: {med[0] - med[4]:+.2f} s")
PY
