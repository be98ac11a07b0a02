#!/usr/bin/env bash
# The tests, on a fresh machine too: installs the system tools they run when one is
# missing (as root, with apt-get; Debian 12 or later), then runs
# `cargo test --workspace` with the arguments given, e.g.
#   scripts/test.sh                          # everything
#   scripts/test.sh -p blockproof-store      # one crate
#   scripts/test.sh -p blockproof --test s3  # one test file
# Silent when every tool is present. Not root: says what is missing and how to install
# it, runs the tests anyway (crates that need no tool pass), and repeats the hint if
# they fail. This is the only place the test tools are installed; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

# TOOL:PACKAGE for every program a test runs.
tools=(
  qemu-img:qemu-utils # images of every format, conversions, qcow2 bitmaps
  qemu-nbd:qemu-utils
  qemu-io:qemu-utils
  nbdinfo:libnbd-bin # a second, independent NBD client for serve-nbd
  nbdcopy:libnbd-bin
  nbdkit:nbdkit # NBD servers with filters (delay, error) for failure tests
  mke2fs:e2fsprogs # ext2/ext4 file systems for file-level restore
  sfdisk:fdisk     # partition tables
  mkfs.vfat:dosfstools
  mcopy:mtools
  mkntfs:ntfs-3g
  ntfscp:ntfs-3g
  wimcapture:wimtools # the only way to make directories on NTFS without mounting it
  wimapply:wimtools
  strace:strace # which directories a write fsyncs (durability of directories it creates)
  chromium:chromium # the HTML run report is loaded in headless Chromium
  promtool:prometheus # job runs' Prometheus textfiles are checked with `promtool check metrics`
  fusermount3:fuse3 # `mount` (FUSE, no libfuse); its tests skip where /dev/fuse is missing
)

# An executable in PATH (bash's `command -v` also names files it cannot run), or in the
# sbin directories an ordinary user's PATH lacks (the tests look there too).
have() {
  local path
  { path=$(command -v "$1") && [ -x "$path" ]; } || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

missing_tools=()
missing_packages=()
for entry in "${tools[@]}"; do
  tool=${entry%%:*}
  package=${entry#*:}
  if ! have "$tool"; then
    missing_tools+=("$tool")
    [[ " ${missing_packages[*]} " == *" $package "* ]] || missing_packages+=("$package")
  fi
done

hint() {
  echo "scripts/test.sh: missing ${missing_tools[*]}; the tests that run them fail." >&2
  echo "  Install them as root: apt-get install ${missing_packages[*]}" >&2
}

if ((${#missing_packages[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing ${missing_packages[*]} (for ${missing_tools[*]})" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing_packages[@]}" >/dev/null
    for tool in "${missing_tools[@]}"; do
      have "$tool" || { echo "scripts/test.sh: $tool is still missing after the install" >&2; exit 1; }
    done
    missing_packages=()
  else
    hint
  fi
fi

# A running VM under libvirt (crates/cli/tests/libvirt_vm.rs): QEMU and libvirt; and the
# QEMU guest agent (crates/cli/tests/live_vm.rs runs a real qemu-ga that may only sync,
# ping and refuse). On Debian 12 they come from bookworm-backports: Debian 12's own
# qemu-system (7.2) would replace the qemu-utils 10.0.2 the other tests use; backports
# has the matching 10.0.2.
vm_tools=(qemu-system-x86_64 libvirtd virtlogd virsh qemu-ga)
vm_packages=(qemu-system-x86 libvirt-daemon-system libvirt-clients qemu-guest-agent)
missing_vm=()
for tool in "${vm_tools[@]}"; do
  have "$tool" || missing_vm+=("$tool")
done

# Adds the backports suite of this Debian release to apt's sources (deb822), with the
# URIs and key of the Debian entry already there; nothing when it is listed already.
add_backports() {
  local suite=$1 file=/etc/apt/sources.list.d/$1.sources
  if grep -rqs -- "$suite" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  local uris key
  uris=$(awk -v s="$2" '/^URIs:/ {u=$2} /^Suites:/ && (" " $0 " ") ~ (" " s " ") {print u; exit}' /etc/apt/sources.list.d/debian.sources)
  key=$(awk -v s="$2" '/^Signed-By:/ {k=$2} /^Suites:/ && (" " $0 " ") ~ (" " s " ") {f=1} f && /^Signed-By:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  [ -n "$uris" ] || uris=http://deb.debian.org/debian
  [ -n "$key" ] || key=/usr/share/keyrings/debian-archive-keyring.gpg
  printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' "$uris" "$suite" "$key" >"$file"
}

if ((${#missing_vm[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ -r /etc/os-release ]; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    echo "scripts/test.sh: installing ${vm_packages[*]} (for ${missing_vm[*]})" >&2
    export DEBIAN_FRONTEND=noninteractive
    target=()
    if [ "$codename" = bookworm ]; then
      add_backports bookworm-backports bookworm
      target=(-t bookworm-backports)
    fi
    apt-get update -qq
    apt-get install -y -qq "${target[@]}" "${vm_packages[@]}" >/dev/null
    for tool in "${missing_vm[@]}"; do
      have "$tool" || { echo "scripts/test.sh: $tool is still missing after the install" >&2; exit 1; }
    done
  else
    echo "scripts/test.sh: missing ${missing_vm[*]}; the libvirt tests fail." >&2
    echo "  Install them as root (Debian 12: from bookworm-backports):" >&2
    echo "  apt-get install -t bookworm-backports ${vm_packages[*]}" >&2
  fi
fi

# A bootable test disk (crates/cli/tests/boot_test.rs builds it, harness/bootdisk.rs):
# the kernel of linux-image-amd64 with its modules, and a statically linked busybox for
# the initramfs; OVMF for the UEFI boot. None is a program in PATH, so they are checked
# here.
boot_packages=()
compgen -G '/boot/vmlinuz-*' >/dev/null || boot_packages+=(linux-image-amd64)
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || boot_packages+=(ovmf)
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
  boot_packages+=(busybox-static)
fi
if ((${#boot_packages[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing ${boot_packages[*]} (for the boot tests)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # A kernel package runs hooks (initramfs); if it cannot be installed here, say so and
    # run the tests anyway: only the boot tests need it.
    apt-get install -y -qq --no-install-recommends "${boot_packages[@]}" >/dev/null ||
      echo "scripts/test.sh: installing ${boot_packages[*]} failed; the boot tests fail." >&2
  else
    echo "scripts/test.sh: missing ${boot_packages[*]}; the boot tests fail." >&2
    echo "  Install them as root: apt-get install --no-install-recommends ${boot_packages[*]}" >&2
  fi
fi

status=0
cargo test --workspace "$@" || status=$?
if ((status)) && ((${#missing_packages[@]})); then
  hint
fi
exit "$status"
