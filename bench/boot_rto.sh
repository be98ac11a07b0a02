#!/usr/bin/env bash
# Recovery time to a booted guest, two ways, same disk, same kernel, same marker:
#  A. `restore-test --boot`: instant access — the VM boots over the repository's own NBD
#     exports through a qcow2 overlay; the figure is the command's wall time and its
#     `boot_seconds` (QEMU start to the marker).
#  B. `restore` of the disk to a raw file, then QEMU booting the restored file: the
#     restore's wall time plus QEMU's start to the marker (the kernel and initrd read out
#     of the restored file with `cat --image`, as A reads them out of the backup).
# The disk is the tests' bootable disk (crates/cli/tests/harness/bootdisk.rs: 64 MiB, MBR,
# one ext4 partition with the host's Debian kernel and a busybox initramfs that prints
# BLOCKPROOF-BOOT-OK once it has mounted the root filesystem), written by the ignored test
# `write_boot_disk`. TCG on 2 vCPUs, 256 MiB, direct kernel boot, both ways.
#
# usage: bench/boot_rto.sh [RUNS=3] [WORKDIR=/tmp/blockproof-boot-bench]
# BLOCKPROOF_BIN: the binary to time (default: a release build made here).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
runs=${1:-3}
work=${2:-/tmp/blockproof-boot-bench}
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
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

(cd "$here/.." && BLOCKPROOF_BOOT_DISK="$work/vda.img" \
  cargo test -q -p blockproof --test boot_test -- --ignored --exact write_boot_disk >/dev/null)
"$bin" init --repo "$work/repo" >/dev/null
"$bin" backup --repo "$work/repo" --vm bench --disk "id=vda,source=$work/vda.img" -q >/dev/null

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc; }

printf '| run | A: restore-test --boot wall (s) | A: boot_seconds (s) | B: restore (s) | B: boot to marker (s) | B: total (s) |\n'
printf '|---|---|---|---|---|---|\n'
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
  printf '| %s | %.2f | %s | %.2f | %.2f | %.2f |\n' "$run" "$a_wall" "$a_boot" \
    "$(secs "$t0" "$t1")" "$(secs "$t1" "$t2")" "$(secs "$t0" "$t2")"
done
