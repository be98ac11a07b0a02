#!/usr/bin/env bash
# Back up a running libvirt/QEMU domain with blockproof, incrementally, through libvirt's
# pull-mode backup API (virsh backup-begin) and its checkpoints (persistent dirty bitmaps
# in the domain's qcow2 disks).
#
#   examples/libvirt-backup.sh DOMAIN REPO [extra blockproof backup options...]
#
# What it does:
#   1. Picks the checkpoint of the last successful backup (kept in a state file); without
#      one, the backup is full.
#   2. virsh backup-begin in pull mode with a new checkpoint: libvirt freezes a
#      point-in-time view of every qcow2 disk (copy-before-write into scratch files) and
#      serves it read-only over NBD on a private unix socket, one export per disk target
#      (vda, vdb, ...), with the dirty bitmap "backup-<target>" covering everything
#      written since the chosen checkpoint.
#   3. blockproof backup reads the exports: id=<domain uuid>-<target> (a stable disk id,
#      never a position), cbt=bitmap:backup-<target> for an incremental.
#   4. Exit 0: virsh domjobabort ends the job (that is how a pull-mode backup is finished),
#      the new checkpoint becomes the base for next time, older checkpoints are deleted.
#      Exit 3: blockproof stored the backup but found the source and the backup differ;
#      the job is KEPT so the point-in-time export stays available for investigation and
#      healing; the script prints what to do and exits 3.
#      Any other failure: the job is aborted and the new checkpoint deleted (libvirt
#      merges its bitmap into its parent), so the next run is still incremental from the
#      last good backup and misses nothing.
#
# Requirements: libvirt >= 7.2 with QEMU >= 6.0 (incremental backup enabled), qcow2 disks
# (checkpoints need persistent bitmaps), BLOCKPROOF_PASSWORD or --password-file for the
# repository. Run as a user allowed to manage the domain. This script cannot run in CI
# (it needs a running domain); it follows libvirt's formatbackup and formatcheckpoint
# documentation (https://libvirt.org/formatbackup.html, /formatcheckpoint.html).
set -euo pipefail

domain=${1:?usage: $0 DOMAIN REPO [blockproof backup options...]}
repo=${2:?usage: $0 DOMAIN REPO [blockproof backup options...]}
shift 2
blockproof=${BLOCKPROOF:-blockproof}
state_dir=${BLOCKPROOF_STATE_DIR:-/var/lib/blockproof/libvirt}
mkdir -p "$state_dir"
state="$state_dir/$domain.checkpoint"
uuid=$(virsh domuuid "$domain")
work=$(mktemp -d "/tmp/blockproof-libvirt-$domain.XXXXXX")
chmod 700 "$work"
socket="$work/nbd.sock"

# The domain's qcow2 disks (target names), from its live XML.
mapfile -t targets < <(virsh dumpxml "$domain" | python3 -c '
import sys, xml.etree.ElementTree as ET
for d in ET.parse(sys.stdin).getroot().findall("./devices/disk[@device=\"disk\"]"):
    drv, tgt = d.find("driver"), d.find("target")
    if drv is not None and drv.get("type") == "qcow2" and tgt is not None:
        print(tgt.get("dev"))')
if [ "${#targets[@]}" -eq 0 ]; then
  echo "$domain has no qcow2 disks: checkpoints and pull-mode incrementals need qcow2" >&2
  exit 1
fi

# The checkpoint of the last good backup, if libvirt still has it.
base=
if [ -s "$state" ]; then
  base=$(cat "$state")
  if ! virsh checkpoint-info "$domain" "$base" >/dev/null 2>&1; then
    echo "checkpoint $base of the last backup is gone: this backup reads everything" >&2
    base=
  fi
fi
new="blockproof-$(date -u +%Y%m%dT%H%M%SZ)"

{
  echo "<domainbackup mode='pull'>"
  [ -n "$base" ] && echo "  <incremental>$base</incremental>"
  echo "  <server transport='unix' socket='$socket'/>"
  echo "  <disks>"
  for t in "${targets[@]}"; do
    echo "    <disk name='$t' backup='yes' type='file'><scratch file='$work/scratch-$t.qcow2'/></disk>"
  done
  echo "  </disks>"
  echo "</domainbackup>"
} > "$work/backup.xml"
{
  echo "<domaincheckpoint>"
  echo "  <name>$new</name>"
  echo "  <disks>"
  for t in "${targets[@]}"; do echo "    <disk name='$t' checkpoint='bitmap'/>"; done
  echo "  </disks>"
  echo "</domaincheckpoint>"
} > "$work/checkpoint.xml"

job_running=0
cleanup() {
  local rc=$?
  if [ "$job_running" = 1 ] && [ "$rc" != 3 ]; then
    virsh domjobabort "$domain" >/dev/null 2>&1 || true
    if [ "$rc" != 0 ]; then
      # The new checkpoint's changes merge into its parent: nothing is lost for next time.
      virsh checkpoint-delete "$domain" "$new" >/dev/null 2>&1 || true
    fi
  fi
  [ "$rc" = 3 ] || rm -rf "$work"
}
trap cleanup EXIT

virsh backup-begin "$domain" "$work/backup.xml" "$work/checkpoint.xml"
job_running=1

disks=()
for t in "${targets[@]}"; do
  spec="id=$uuid-$t,source=nbd+unix:///$t?socket=$socket"
  if [ -n "$base" ]; then
    spec="$spec,cbt=bitmap:backup-$t"
  fi
  disks+=(--disk "$spec")
done

set +e
"$blockproof" backup --repo "$repo" --vm "$domain" "${disks[@]}" "$@"
rc=$?
set -e

case $rc in
  0)
    virsh domjobabort "$domain"
    job_running=0
    echo "$new" > "$state.tmp" && mv "$state.tmp" "$state"
    # Older blockproof checkpoints are no longer needed as incremental bases.
    for cp in $(virsh checkpoint-list "$domain" --name | grep '^blockproof-' || true); do
      [ "$cp" = "$new" ] || virsh checkpoint-delete "$domain" "$cp" >/dev/null
    done
    ;;
  3)
    echo "blockproof found the backup and the source differ (exit 3)." >&2
    echo "The pull-mode job is still running: the export at $socket is the same point in time." >&2
    echo "Investigate, then end it with: virsh domjobabort $domain" >&2
    echo "The next run of this script reads every disk in full." >&2
    rm -f "$state"
    exit 3
    ;;
  *)
    exit "$rc"
    ;;
esac
