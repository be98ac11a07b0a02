//! A disk and what was found on it: its partitions and their filesystems.

use std::fmt;
use std::sync::Arc;

use crate::error::FsError;
use crate::filesystem::Filesystem;
use crate::fs_kind::{self, FsKind};
use crate::partition_table;
use crate::window::Window;
use crate::ReadAt;

/// How the disk is divided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    Gpt,
    Mbr,
    /// No partition table: one filesystem on the whole disk (partition index 0).
    None,
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableKind::Gpt => "gpt",
            TableKind::Mbr => "mbr",
            TableKind::None => "none",
        })
    }
}

/// One partition (or the whole disk, index 0, when it has no partition table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// The number users give to `--partition`: the GPT entry number, the MBR slot (1-4)
    /// or logical partition (5 and up), as Linux numbers them; 0 for the whole disk.
    pub index: u32,
    /// First byte on the disk.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// The GPT type GUID (upper case) or the MBR type byte (`0x83`).
    pub type_id: String,
    /// A readable name for the type (`Linux filesystem`), `unknown` if not known.
    pub type_name: String,
    /// The GPT partition name, if any.
    pub name: Option<String>,
    /// The filesystem its first bytes show, if any is recognised.
    pub filesystem: Option<FsKind>,
}

/// A disk opened for browsing: the byte source and its partitions.
pub struct Disk {
    src: Arc<dyn ReadAt>,
    table: TableKind,
    partitions: Vec<Partition>,
}

impl Disk {
    /// Reads the partition table (GPT, then a filesystem on the whole disk, then MBR) and
    /// probes each partition's filesystem. Fails when the table is damaged or nothing at
    /// all is found.
    pub fn open(src: Box<dyn ReadAt>) -> Result<Disk, FsError> {
        let src: Arc<dyn ReadAt> = Arc::from(src);
        let found = match partition_table::read_gpt(&src)? {
            Some(found) => Some(found),
            None => match whole_disk(&src)? {
                Some(p) => Some((TableKind::None, vec![p])),
                None => partition_table::read_mbr(&src)?,
            },
        };
        let Some((table, mut partitions)) = found else {
            return Err(FsError::NoFilesystem);
        };
        for p in partitions.iter_mut().filter(|p| p.filesystem.is_none()) {
            // A partition that cannot even be probed (beyond the end of a truncated
            // image) is listed without a filesystem; opening it reports the read error.
            p.filesystem = fs_kind::probe(&mut Window::new(src.clone(), p.start, p.size)).ok().flatten();
        }
        Ok(Disk { src, table, partitions })
    }

    pub fn table(&self) -> TableKind {
        self.table
    }

    pub fn size(&self) -> u64 {
        self.src.size()
    }

    /// Every partition, in table order.
    pub fn partitions(&self) -> &[Partition] {
        &self.partitions
    }

    /// The partition `index`, or with `None` the only one holding a readable filesystem,
    /// passing over EFI system and Windows recovery partitions when that leaves one.
    pub fn select(&self, index: Option<u32>) -> Result<&Partition, FsError> {
        let available = || {
            let list: Vec<String> = self
                .partitions
                .iter()
                .map(|p| format!("{}: {}", p.index, p.filesystem.map_or("no filesystem", FsKind::name)))
                .collect();
            if list.is_empty() {
                "no partitions".to_string()
            } else {
                list.join(", ")
            }
        };
        match index {
            Some(index) => self
                .partitions
                .iter()
                .find(|p| p.index == index)
                .ok_or_else(|| FsError::NoSuchPartition { index, available: available() }),
            None => {
                let readable: Vec<&Partition> =
                    self.partitions.iter().filter(|p| p.filesystem.is_some_and(FsKind::is_readable)).collect();
                // EFI system and Windows recovery partitions hold firmware and tools, not
                // the files anyone comes for: passed over when that leaves one.
                let main: Vec<&Partition> = readable.iter().copied().filter(|p| !is_auxiliary(p)).collect();
                match (&readable[..], &main[..]) {
                    ([only], _) | (_, [only]) => Ok(only),
                    ([], _) => Err(FsError::NoReadableFilesystem { available: available() }),
                    _ => Err(FsError::Ambiguous { count: readable.len(), available: available() }),
                }
            }
        }
    }

    /// Opens the filesystem of partition `index` (see [`Disk::select`]).
    pub fn open_filesystem(&self, index: Option<u32>) -> Result<Filesystem, FsError> {
        let p = self.select(index)?;
        let window = Window::new(self.src.clone(), p.start, p.size);
        match p.filesystem {
            Some(kind) if kind.is_readable() => Filesystem::open(kind, window),
            Some(other) => Err(FsError::Unsupported { index: p.index, what: other.to_string() }),
            None => Err(FsError::Unsupported { index: p.index, what: "no recognised filesystem".to_string() }),
        }
    }
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disk").field("table", &self.table).field("partitions", &self.partitions).finish()
    }
}

/// An EFI system or Windows recovery partition (by GPT type GUID or MBR type byte).
fn is_auxiliary(p: &Partition) -> bool {
    matches!(
        p.type_id.as_str(),
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" | "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" | "0xef" | "0x27"
    )
}

/// A filesystem on the whole disk, as partition 0.
fn whole_disk(src: &Arc<dyn ReadAt>) -> Result<Option<Partition>, FsError> {
    let size = src.size();
    let kind = fs_kind::probe(&mut Window::new(src.clone(), 0, size)).map_err(|e| FsError::from_io("disk", e))?;
    Ok(kind.map(|kind| Partition {
        index: 0,
        start: 0,
        size,
        type_id: String::new(),
        type_name: "whole disk".to_string(),
        name: None,
        filesystem: Some(kind),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs_kind::FatType;

    fn part(index: u32, type_id: &str, filesystem: Option<FsKind>) -> Partition {
        Partition {
            index,
            start: u64::from(index) << 20,
            size: 1 << 20,
            type_id: type_id.to_string(),
            type_name: String::new(),
            name: None,
            filesystem,
        }
    }

    fn disk(partitions: Vec<Partition>) -> Disk {
        Disk { src: Arc::new(Vec::new()), table: TableKind::Gpt, partitions }
    }

    #[test]
    fn the_default_is_the_one_filesystem_that_is_not_firmware_or_recovery() {
        const EFI: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
        const RECOVERY: &str = "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC";
        const DATA: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";
        let fat = Some(FsKind::Fat(FatType::Fat32));
        let windows = disk(vec![
            part(1, EFI, fat),
            part(2, "E3C9E316-0B5C-4DB8-817D-F92DF00215AE", None),
            part(3, DATA, Some(FsKind::Ntfs)),
            part(4, RECOVERY, Some(FsKind::Ntfs)),
        ]);
        assert_eq!(windows.select(None).unwrap().index, 3);
        assert_eq!(windows.select(Some(1)).unwrap().index, 1);
        // Only firmware: that is what there is.
        assert_eq!(
            disk(vec![part(1, EFI, fat), part(2, DATA, Some(FsKind::Other("xfs")))]).select(None).unwrap().index,
            1
        );
        let linux = disk(vec![part(1, EFI, fat), part(2, DATA, fat), part(3, DATA, fat)]);
        let err = linux.select(None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the disk has 3 filesystems (1: fat32, 2: fat32, 3: fat32); choose one by its partition number"
        );
        let err = disk(vec![part(1, DATA, None), part(2, DATA, Some(FsKind::Other("xfs")))]).select(None).unwrap_err();
        assert!(matches!(err, FsError::NoReadableFilesystem { .. }) && !err.is_usage(), "{err}");
        assert!(err.to_string().contains("1: no filesystem, 2: xfs"), "{err}");
    }

    #[test]
    fn an_empty_or_garbage_disk_has_nothing() {
        for disk in [vec![0u8; 1 << 20], (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect()]
        {
            assert!(matches!(Disk::open(Box::new(disk)), Err(FsError::NoFilesystem)));
        }
        assert!(matches!(Disk::open(Box::new(Vec::new())), Err(FsError::NoFilesystem | FsError::Read { .. })));
        assert!(Disk::open(Box::new(vec![0u8; 100])).is_err());
    }
}
