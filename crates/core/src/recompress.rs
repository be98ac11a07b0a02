//! Cold-data recompression (`gc --recompress BUDGET`): backups stay fast with LZ4, and
//! maintenance later rewrites the packs that have gone cold with zstd, so a repository
//! ends up about as small as one written with zstd from the start.
//!
//! It is a repack with a different reason, and rides on gc's safety ([`crate::gc`]):
//! under the gc lock, a chosen pack's referenced blobs are opened (authenticated,
//! decompressed and re-hashed to their ids — a blob that fails is never rewritten, and
//! its pack stays as it is), compressed again with zstd at [`RECOMPRESS_LEVEL`], sealed
//! and written into new packs, which are durable and indexed before the old pack is
//! planned for deletion. From there the plan is gc's: swept once no backup that could
//! still use the old pack runs, and only if every blob in it that is referenced has a
//! copy in a pack that stays. Blob ids do not change, so no snapshot, index page or
//! confirmation page is rewritten.
//!
//! Which packs: indexed ones not already planned, last written at least `older_than`
//! ago, holding at least one referenced LZ4 blob; oldest first, until the budget (the
//! `check --read-data` syntax: a share or size of those packs' bytes, a number of packs
//! as `ios`, a time) is spent. Blobs stored uncompressed or with zstd are copied as
//! they are.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use blockproof_format::{Codec, Compression, Id};
use blockproof_repo::{open_blob, BlobCodec, BlobIndex, PackWriter, Repository, SealedBlob};
use blockproof_store::Kind;

use crate::gc::GcReport;
use crate::live_blobs::{for_each_live_list, LiveBlobs, PackUsage};
use crate::{Budget, CoreError, Progress};

/// The zstd level cold packs are rewritten with: slower than a backup could afford
/// (level 1 is the backup default), paid once per blob.
pub const RECOMPRESS_LEVEL: i32 = 9;

/// What to recompress.
#[derive(Clone, Debug)]
pub struct RecompressOptions {
    /// How much to rewrite in this run.
    pub budget: Budget,
    /// Only packs last written at least this long ago.
    pub older_than: Duration,
}

/// A pack chosen for recompression, with its size.
pub(crate) struct Chosen {
    pub pack: Id,
    pub size: u64,
}

/// Chooses the packs to recompress, oldest first, within the budget's bytes and pack
/// count. `skip`: packs gc already plans or repacks.
pub(crate) fn choose(
    repo: &Repository,
    opts: &RecompressOptions,
    stored: &[(String, Id)],
    index: &BlobIndex,
    usage: &[PackUsage],
    skip: &HashSet<Id>,
) -> Result<Vec<Chosen>, CoreError> {
    let cutoff = SystemTime::now().checked_sub(opts.older_than).unwrap_or(SystemTime::UNIX_EPOCH);
    // One listing for every pack's size (a request per pack on object storage otherwise).
    let sizes: HashMap<String, u64> = repo.backend().list_sizes(Kind::Pack)?.into_iter().collect();
    let mut candidates = Vec::new();
    for (name, pack) in stored {
        if skip.contains(pack) {
            continue;
        }
        // Indexed, with a referenced LZ4 blob.
        if !index.pack_position(pack).is_some_and(|p| usage[p as usize].live_lz4) {
            continue;
        }
        let modified = match repo.backend().modified(Kind::Pack, name) {
            Ok(t) => t,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        if modified > cutoff {
            continue;
        }
        let Some(&size) = sizes.get(name) else { continue };
        candidates.push((modified, *pack, size));
    }
    candidates.sort();
    let total: u64 = candidates.iter().map(|c| c.2).sum();
    let byte_limit = opts.budget.byte_limit(total);
    let mut chosen = Vec::new();
    let mut bytes = 0u64;
    for (_, pack, size) in candidates {
        let over_ios = opts.budget.ios.is_some_and(|n| chosen.len() as u64 >= n);
        // The first pack is always taken when the budget allows anything: a budget
        // smaller than one pack still makes progress.
        if opts.budget.nothing || over_ios || (!chosen.is_empty() && bytes + size > byte_limit) {
            break;
        }
        bytes += size;
        chosen.push(Chosen { pack, size });
    }
    Ok(chosen)
}

/// Rewrites the chosen packs' referenced blobs into new packs, LZ4 ones recompressed
/// with zstd; returns the packs that were rewritten whole (to be planned for deletion).
/// Stops choosing more when the budget's time is up. A pack holding a blob that does not
/// open is left alone, with a warning.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rewrite(
    repo: &Repository,
    opts: &RecompressOptions,
    chosen: &[Chosen],
    index: &BlobIndex,
    live: &LiveBlobs,
    usage: &[PackUsage],
    report: &mut GcReport,
    progress: &dyn Progress,
) -> Result<Vec<Id>, CoreError> {
    if chosen.is_empty() {
        return Ok(Vec::new());
    }
    let started = Instant::now();
    let deadline = opts.budget.deadline(started).map(|(at, _)| at);
    let mut codec = BlobCodec::new(repo.keys().clone(), Codec::Zstd, RECOMPRESS_LEVEL);
    let mut writer = PackWriter::new(repo);
    let mut done = Vec::new();
    progress.begin_count("recompress", chosen.len() as u64);
    let packs: Vec<Id> = chosen.iter().map(|c| c.pack).collect();
    for_each_live_list(index, live, usage, &packs, |k, entries| {
        let c = &chosen[k];
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
        let hex = c.pack.to_hex();
        let mut bytes = vec![0u8; c.size as usize];
        repo.backend().read_at(Kind::Pack, &hex, 0, &mut bytes)?;
        let mut out = Vec::new();
        let (mut from, mut to) = (0u64, 0u64);
        let mut damaged = None;
        for e in &entries {
            let Some(sealed) =
                usize::try_from(e.offset).ok().and_then(|o| bytes.get(o..o.checked_add(e.length as usize)?))
            else {
                damaged = Some(format!("blob {} lies outside the pack", e.id));
                break;
            };
            from += u64::from(e.length);
            let copy = || SealedBlob {
                kind: e.kind,
                id: e.id,
                compression: e.compression,
                raw_length: e.raw_length,
                bytes: sealed.to_vec(),
            };
            let blob = if e.compression == Compression::Lz4 {
                match open_blob(repo.keys(), e, sealed, &format!("pack {hex}")) {
                    // Always the new form, even in the (unseen) case that it is not
                    // smaller: a pack left with LZ4 blobs would be chosen again each run.
                    Ok(plain) => codec.seal(e.kind, e.id, &plain),
                    Err(err) => {
                        damaged = Some(err.to_string());
                        break;
                    }
                }
            } else {
                copy()
            };
            to += blob.bytes.len() as u64;
            out.push(blob);
        }
        if let Some(why) = damaged {
            progress.warn(&format!(
                "pack {hex} was not recompressed: {why} (it stays as it is; run blockproof check --read-data)"
            ));
        } else {
            for blob in out {
                writer.add(blob)?;
            }
            report.packs_recompressed += 1;
            report.bytes_recompressed_from += from;
            report.bytes_recompressed_to += to;
            done.push(c.pack);
        }
        progress.advance(1);
        Ok(true)
    })?;
    writer.finish()?;
    progress.end();
    Ok(done)
}
