//! The state documents caching a disk's confirmation page summaries (FORMAT §19, §20):
//! `state/confirm-<hex>`, named by a keyed hash of the vm and disk, holds the page
//! summaries of a disk of one group or the group list of a larger one, whose groups'
//! page summaries are in `state/confirm-<hex>-<group>`. A backup reads them before it
//! loads the parent's confirmation state and writes them after its commit (only the
//! groups it stored anew); forget removes them once no snapshot of the disk remains.
//! They are a cache: absent, unreadable or stale, the pages are read instead. A group
//! list carries its basis (the index files the writer's lookups rested on); only a
//! backup whose index still holds it keeps listed groups without looking them up.
//! Beside them, `state/confirm-<hex>-tree` holds the disk's tree basis: the root of the
//! data tree the writer committed and the basis on which every blob of that tree was
//! found or written (FORMAT §19a), so that the next backup inherits from that tree
//! without a lookup per chunk, and its unchanged pages without reading them, while the
//! basis holds. It goes with the list.

use std::collections::{HashMap, HashSet};

use blockproof_format::basis::{decode_tree_basis, encode_tree_basis, IndexBasis};
use blockproof_format::confirm::{decode_any, decode_summaries, Summaries};
use blockproof_format::{DiskEntry, Id, ObjectMagic};
use blockproof_repo::{Repository, SnapshotInfo};
use blockproof_store::Kind;

use crate::confirm::{Known, Runs, SummaryDocs};
use crate::CoreError;

/// The document of `disk` of `vm` (a group's: `-<group>` appended).
pub(crate) fn name(repo: &Repository, vm: &str, disk: &str) -> String {
    format!("confirm-{}", repo.keys().name_id(&format!("{vm}/{disk}")).to_hex())
}

fn group_name(list: &str, group: u64) -> String {
    format!("{list}-{group}")
}

/// The disk's tree basis document (removed with the disk's list).
fn tree_name(list: &str) -> String {
    format!("{list}-tree")
}

/// Whether every blob the data tree of `entry` references may be reused without a lookup:
/// the disk's tree basis document names that tree's root, and `holds` says its basis
/// still holds.
pub(crate) fn tree_reusable(
    repo: &Repository,
    vm: &str,
    entry: &DiskEntry,
    holds: impl FnOnce(&IndexBasis) -> bool,
) -> bool {
    repo.read_doc(Kind::State, ObjectMagic::State, &tree_name(&name(repo, vm, &entry.id)))
        .ok()
        .and_then(|b| decode_tree_basis(&b).ok())
        .is_some_and(|(root, basis)| root == entry.index_root && holds(&basis))
}

/// What a backup of `vm` left for `disk` ([`Known::None`] when there is nothing or it
/// cannot be read: the pages are then read). A group list reads a group's page summaries
/// only when the group is needed; its leaf pages may be reused without a lookup when it
/// has a basis and `holds` says that basis still holds.
pub(crate) fn known<'a>(
    repo: &'a Repository,
    vm: &str,
    disk: &str,
    holds: impl FnOnce(&IndexBasis) -> bool,
) -> Known<'a> {
    let list = name(repo, vm, disk);
    match repo.read_doc(Kind::State, ObjectMagic::State, &list).ok().and_then(|b| decode_any(&b).ok()) {
        None => Known::None,
        Some(Summaries::Pages(pages)) => Known::Pages(pages.into_iter().collect()),
        Some(Summaries::Groups(groups, basis)) => Known::Groups {
            groups,
            reusable: basis.as_ref().is_some_and(holds),
            load: Box::new(move |g| -> HashMap<Id, Runs> {
                repo.read_doc(Kind::State, ObjectMagic::State, &group_name(&list, g))
                    .ok()
                    .and_then(|b| decode_summaries(&b).ok())
                    .map(|v| v.into_iter().collect())
                    .unwrap_or_default()
            }),
        },
    }
}

/// After a commit: keeps a disk's summaries for the next backup, the groups' documents
/// before the list naming them, with `basis`, and the tree basis of the disk's data tree
/// (`root`) on that basis (a cache; a failure is a warning).
pub(crate) fn keep(
    repo: &Repository,
    vm: &str,
    disk: &str,
    root: Id,
    docs: &SummaryDocs,
    basis: Option<&IndexBasis>,
    warnings: &mut Vec<String>,
) {
    let list = name(repo, vm, disk);
    if let Some(basis) = basis {
        let doc = encode_tree_basis(root, basis);
        if let Err(e) = repo.write_doc(Kind::State, ObjectMagic::State, &tree_name(&list), &doc) {
            warnings.push(format!(
                "disk {disk}: the basis of its index pages could not be kept ({e}); the next backup looks their chunks up"
            ));
        }
    }
    let written = docs
        .groups
        .iter()
        .try_for_each(|(g, bytes)| repo.write_doc(Kind::State, ObjectMagic::State, &group_name(&list, *g), bytes))
        .and_then(|()| repo.write_doc(Kind::State, ObjectMagic::State, &list, &docs.encode_list(basis)));
    if let Err(e) = written {
        warnings.push(format!(
            "disk {disk}: the confirmation page summaries could not be kept ({e}); the next backup reads the pages"
        ));
    }
}

/// After snapshots were removed: removes the summaries of every disk of `removed` (vm,
/// disk ids) that no snapshot in `remaining` has any more (the vm's next backup of such a
/// disk is a full one, which needs none). Returns how many documents it removed.
pub(crate) fn prune(
    repo: &Repository,
    removed: &[(String, Vec<String>)],
    remaining: &[SnapshotInfo],
) -> Result<u64, CoreError> {
    let kept: HashSet<(&str, &str)> = remaining
        .iter()
        .flat_map(|s| s.snapshot.disks.iter().map(move |d| (s.snapshot.vm.as_str(), d.id.as_str())))
        .collect();
    let mut gone: Vec<String> = Vec::new();
    for (vm, disks) in removed {
        for disk in disks {
            if !kept.contains(&(vm.as_str(), disk.as_str())) {
                gone.push(name(repo, vm, disk));
            }
        }
    }
    gone.sort_unstable();
    gone.dedup();
    if gone.is_empty() {
        return Ok(0);
    }
    let mut count = 0;
    for n in repo.backend().list(Kind::State)? {
        let Some(rest) = n.strip_prefix("confirm-") else { continue };
        let list = &n[..("confirm-".len() + rest.find('-').unwrap_or(rest.len()))];
        if gone.binary_search_by(|g| g.as_str().cmp(list)).is_ok() {
            match repo.backend().remove(Kind::State, &n) {
                Ok(()) => count += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(count)
}
