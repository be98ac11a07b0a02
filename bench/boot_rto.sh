#!/usr/bin/env bash
# Recovery time to a booted guest, two ways, same disk, same kernel, same marker:
#  A. `restore-test --boot`: instant access — the VM boots over the repository's own NBD
#     exports through a qcow2 overlay; the figure is the command's wall time and its
#     `boot_seconds` (QEMU start to the marker).
#  B. `restore` of the disk to a raw file, then QEMU booting the restored file: the
#     restore's wall time plus QEMU's start to the marker (the kernel and initrd read out
#     of the restored file with `cat --image`, as A reads them out of the backup).
#  C. `recover`: instant recovery — the VM boots over the same exports under local qcow2
#     images while QEMU copies the disk into them; the figures are the time from the
#     command's start to the marker, and to the end of the copy (the VM then runs on
#     local disks; the guest is told to stay up with `blockproof.stay`).
# The disk is the tests' bootable disk (crates/cli/tests/harness/bootdisk.rs: 64 MiB, MBR,
# one ext4 partition with the host's Debian kernel and a busybox initramfs that prints
# BLOCKPROOF-BOOT-OK once it has mounted the root filesystem), written by the ignored test
# `write_boot_disk`. TCG on 2 vCPUs, 256 MiB, direct kernel boot, both ways.
#
# EXTRA_MIB: random data appended to the disk after its partition (the guest never reads
# it), so that the disk is as large as a real one: a restore copies it all before the
# boot, a recovery boots at once and copies it under the running VM.
#
# usage: bench/boot_rto.sh [RUNS=3] [WORKDIR=/tmp/blockproof-boot-bench] [EXTRA_MIB=0]
# BLOCKPROOF_BIN: the binary to time (default: a release build made here).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
runs=${1:-3}
work=${2:-/tmp/blockproof-boot-bench}
extra_mib=${3:-0}
# RECOVER_SPEED: `recover --speed` (bytes per second per disk, e.g. 50M); default unlimited.
speed_args=()
[ -n "${RECOVER_SPEED:-}" ] && speed_args=(--speed "$RECOVER_SPEED")
if [ -z "${BLOCKPROOF_BIN:-}" ]; then
  (cd "$here/.." && cargo build --release -q)
  BLOCKPROOF_BIN="$here/../target/release/blockproof"
fi
bin=$BLOCKPROOF_BIN
export BLOCKPROOF_PASSWORD=bench
marker=BLOCKPROOF-BOOT-OK
append="console=ttyS0 quiet panic=-1"
rm -rf "$work" && mkdir -p "$work"
qemu_pid=
cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null || true
  [ -f "$work/vm/recovery.json" ] && kill "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["qemu_pid"])' "$work/vm/recovery.json")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

(cd "$here/.." && BLOCKPROOF_BOOT_DISK="$work/vda.img" \
  cargo test -q -p blockproof --test boot_test -- --ignored --exact write_boot_disk >/dev/null)
if [ "$extra_mib" -gt 0 ]; then
  dd if=/dev/urandom of="$work/vda.img" bs=1M seek=64 count="$extra_mib" status=none
fi
"$bin" init --repo "$work/repo" >/dev/null
"$bin" backup --repo "$work/repo" --vm bench --disk "id=vda,source=$work/vda.img" -q >/dev/null

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }

quit_vm() {
  python3 - "$1" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
for c in ("qmp_capabilities", "quit"):
    f.write(json.dumps({"execute": c}) + "\n"); f.flush(); f.readline()
PY
}

printf '| run | A: restore-test --boot wall (s) | A: boot_seconds (s) | B: restore (s) | B: boot to marker (s) | B: total (s) | C: recover to marker (s) | C: copy done (s) |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for run in $(seq 1 "$runs"); do
  t0=$(now)
  json=$("$bin" restore-test --repo "$work/repo" bench:latest --no-record --json --boot --accel tcg --cpus 2 \
    --memory 256 --kernel /boot/vmlinuz --initrd /boot/initrd.img --append "$append" \
    --console-marker "$marker" --fail-marker BLOCKPROOF-BOOT-FAILED)
  a_wall=$(secs "$t0" "$(now)")
  a_boot=$(python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["boot_seconds"])' <<<"$json")

  rm -f "$work/restored.raw" "$work/console.log" "$work/kernel" "$work/initrd"
  t0=$(now)
  "$bin" restore --repo "$work/repo" bench:latest --disk vda --to "$work/restored.raw" -q >/dev/null
  t1=$(now)
  "$bin" cat --image "$work/restored.raw" /boot/vmlinuz >"$work/kernel"
  "$bin" cat --image "$work/restored.raw" /boot/initrd.img >"$work/initrd"
  : >"$work/console.log"
  qemu-system-x86_64 -machine q35 -accel tcg -cpu max -m 256 -smp 2 -nodefaults -no-user-config \
    -display none -nic none -no-reboot \
    -drive "if=none,id=disk0,format=raw,cache=unsafe,file=$work/restored.raw" -device virtio-blk-pci,drive=disk0 \
    -kernel "$work/kernel" -initrd "$work/initrd" -append "$append" \
    -chardev "file,id=console,append=on,path=$work/console.log" -serial chardev:console &
  qemu_pid=$!
  until grep -q "$marker" "$work/console.log"; do
    kill -0 "$qemu_pid" 2>/dev/null || { echo "QEMU stopped before $marker" >&2; exit 1; }
    sleep 0.05
  done
  t2=$(now)
  wait "$qemu_pid" || true
  qemu_pid=
  b=("$(secs "$t0" "$t1")" "$(secs "$t1" "$t2")" "$(secs "$t0" "$t2")")

  rm -rf "$work/vm"
  t0=$(now)
  "$bin" recover --repo "$work/repo" bench:latest --dir "$work/vm" -q --json "${speed_args[@]}" --accel tcg --cpus 2 --memory 256 \
    --kernel /boot/vmlinuz --initrd /boot/initrd.img --append "$append blockproof.stay" >/dev/null &
  recover_pid=$!
  t1= t2=
  # The copy may end before or after the guest has booted: both are awaited.
  while [ -z "$t1" ] || [ -z "$t2" ]; do
    if [ -z "$t1" ] && grep -qs "$marker" "$work/vm/console.log"; then t1=$(now); fi
    if [ -z "$t2" ] && ! kill -0 "$recover_pid" 2>/dev/null; then
      wait "$recover_pid" || { echo "recover failed" >&2; exit 1; }
      t2=$(now)
    fi
    if [ "$(echo "$(secs "$t0" "$(now)") > 300" | bc)" = 1 ]; then echo "no $marker within 300 s" >&2; exit 1; fi
    sleep 0.05
  done
  quit_vm "$work/vm/qmp.sock"
  sleep 1
  printf '| %s | %.2f | %s | %.2f | %.2f | %.2f | %.2f | %.2f |\n' "$run" "$a_wall" "$a_boot" \
    "${b[0]}" "${b[1]}" "${b[2]}" "$(secs "$t0" "$t1")" "$(secs "$t0" "$t2")"
done
