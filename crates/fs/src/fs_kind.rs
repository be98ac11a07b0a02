//! Which filesystem a partition holds, told by its superblock or boot-sector magic.
//!
//! Readable: ext2/3/4 (superblock magic `0xEF53` at byte 1080), NTFS (`"NTFS    "` at
//! byte 3 of the boot sector), FAT12/16/32 (a boot sector with a jump instruction, the
//! `0x55AA` signature and a plausible BIOS parameter block; the FAT type follows from
//! the cluster count, as the specification defines it). Recognised so that the message
//! can say what a partition holds, but not readable: exFAT, XFS, Btrfs, LUKS, LVM,
//! Linux swap.

use std::fmt;
use std::io;

use crate::window::Window;

/// The filesystem on a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsKind {
    Ext(ExtVersion),
    Fat(FatType),
    Ntfs,
    /// Recognised, but not readable here (`"xfs"`, `"LUKS"`, ...).
    Other(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtVersion {
    Ext2,
    Ext3,
    Ext4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FatType {
    Fat12,
    Fat16,
    Fat32,
}

impl FsKind {
    /// True for the kinds [`Filesystem`](crate::Filesystem) can open.
    pub fn is_readable(self) -> bool {
        !matches!(self, FsKind::Other(_))
    }

    /// `ext4`, `vfat`-style names as `blkid` prints them (`fat32` for FAT).
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext(ExtVersion::Ext2) => "ext2",
            FsKind::Ext(ExtVersion::Ext3) => "ext3",
            FsKind::Ext(ExtVersion::Ext4) => "ext4",
            FsKind::Fat(FatType::Fat12) => "fat12",
            FsKind::Fat(FatType::Fat16) => "fat16",
            FsKind::Fat(FatType::Fat32) => "fat32",
            FsKind::Ntfs => "ntfs",
            FsKind::Other(name) => name,
        }
    }
}

impl fmt::Display for FsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes read to probe: the boot sector, the ext superblock, and far enough for Btrfs
/// (superblock at 64 KiB).
const PROBE_LEN: u64 = 0x10000 + 4096;

/// Looks at the start of `w` and names the filesystem there, if any. A read error is
/// returned only when not even the first sector can be read.
pub(crate) fn probe(w: &mut Window) -> io::Result<Option<FsKind>> {
    let len = PROBE_LEN.min(w.len());
    let mut head = vec![0u8; len as usize];
    if let Err(err) = w.read_exact_at(&mut head, 0) {
        // A short or damaged partition: probe what the first sector says.
        head.truncate(512.min(len as usize));
        w.read_exact_at(&mut head, 0).map_err(|_| err)?;
    }
    Ok(identify(&head))
}

/// Names the filesystem whose first bytes are `head` (as many as are available).
pub(crate) fn identify(head: &[u8]) -> Option<FsKind> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(3, b"NTFS    ") {
        return Some(FsKind::Ntfs);
    }
    if at(3, b"EXFAT   ") {
        return Some(FsKind::Other("exfat"));
    }
    if let Some(fat) = fat_type(head) {
        return Some(FsKind::Fat(fat));
    }
    if at(1080, &[0x53, 0xEF]) {
        return Some(FsKind::Ext(ext_version(&head[1024..])));
    }
    let others: [(usize, &[u8], &'static str); 6] = [
        (0, b"XFSB", "xfs"),
        (0, b"LUKS\xba\xbe", "LUKS (encrypted)"),
        (512, b"LABELONE", "LVM physical volume"),
        (0x10040, b"_BHRfS_M", "btrfs"),
        (4086, b"SWAPSPACE2", "Linux swap"),
        (4086, b"SWAP-SPACE", "Linux swap"),
    ];
    others.iter().find(|(off, magic, _)| at(*off, magic)).map(|(_, _, name)| FsKind::Other(name))
}

fn le16(b: &[u8], off: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[off], b[off + 1]]))
}

fn le32(b: &[u8], off: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]))
}

/// ext4 if it uses any ext4-only feature, ext3 if it has a journal, else ext2.
fn ext_version(sb: &[u8]) -> ExtVersion {
    if sb.len() < 0x68 {
        return ExtVersion::Ext2;
    }
    let compat = le32(sb, 0x5C);
    let incompat = le32(sb, 0x60);
    let ro_compat = le32(sb, 0x64);
    // incompat: extents, 64bit, flex_bg, mmp, inline data, csum seed;
    // ro_compat: huge_file, gdt_csum, dir_nlink, extra_isize, metadata_csum.
    if incompat & (0x40 | 0x80 | 0x200 | 0x100 | 0x8000 | 0x2000) != 0
        || ro_compat & (0x8 | 0x10 | 0x20 | 0x40 | 0x400) != 0
    {
        ExtVersion::Ext4
    } else if compat & 0x4 != 0 {
        ExtVersion::Ext3
    } else {
        ExtVersion::Ext2
    }
}

/// The FAT type when `boot` is a plausible FAT boot sector.
fn fat_type(boot: &[u8]) -> Option<FatType> {
    if boot.len() < 512 || boot[510..512] != [0x55, 0xAA] || !(boot[0] == 0xE9 || (boot[0] == 0xEB && boot[2] == 0x90))
    {
        return None;
    }
    let bytes_per_sector = le16(boot, 11);
    let sectors_per_cluster = u64::from(boot[13]);
    let reserved = le16(boot, 14);
    let fats = u64::from(boot[16]);
    let root_entries = le16(boot, 17);
    let total = if le16(boot, 19) != 0 { le16(boot, 19) } else { le32(boot, 32) };
    let fat_size = if le16(boot, 22) != 0 { le16(boot, 22) } else { le32(boot, 36) };
    let media = boot[21];
    let plausible = matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
        && sectors_per_cluster.is_power_of_two()
        && sectors_per_cluster <= 128
        && reserved >= 1
        && matches!(fats, 1 | 2)
        && (media == 0xF0 || media >= 0xF8)
        && fat_size > 0
        && total > 0;
    if !plausible {
        return None;
    }
    let root_sectors = (root_entries * 32).div_ceil(bytes_per_sector);
    let data = total.checked_sub(reserved + fats * fat_size + root_sectors)?;
    match data / sectors_per_cluster {
        0..4085 => Some(FatType::Fat12),
        4085..65525 => Some(FatType::Fat16),
        _ => Some(FatType::Fat32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fat_boot(total: u32, spc: u8, fat_size: u16, root_entries: u16) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[..3].copy_from_slice(&[0xEB, 0x3C, 0x90]);
        b[11..13].copy_from_slice(&512u16.to_le_bytes());
        b[13] = spc;
        b[14..16].copy_from_slice(&1u16.to_le_bytes());
        b[16] = 2;
        b[17..19].copy_from_slice(&root_entries.to_le_bytes());
        b[21] = 0xF8;
        b[22..24].copy_from_slice(&fat_size.to_le_bytes());
        b[32..36].copy_from_slice(&total.to_le_bytes());
        b[510..].copy_from_slice(&[0x55, 0xAA]);
        b
    }

    #[test]
    fn fat_type_follows_the_cluster_count() {
        assert_eq!(identify(&fat_boot(2880, 1, 9, 224)), Some(FsKind::Fat(FatType::Fat12)));
        assert_eq!(identify(&fat_boot(200_000, 4, 200, 512)), Some(FsKind::Fat(FatType::Fat16)));
        assert_eq!(identify(&fat_boot(2_000_000, 1, 0, 0)), None, "a zero FAT size is not FAT");
        let mut b = fat_boot(2_000_000, 1, 0, 0);
        b[36..40].copy_from_slice(&16_000u32.to_le_bytes());
        assert_eq!(identify(&b), Some(FsKind::Fat(FatType::Fat32)));
    }

    #[test]
    fn garbage_and_zeros_are_nothing() {
        assert_eq!(identify(&[0u8; 70_000]), None);
        let noise: Vec<u8> = (0..70_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        assert_eq!(identify(&noise), None);
        assert_eq!(identify(&[0xEB, 0x3C, 0x90]), None, "short input");
    }

    #[test]
    fn ext_versions_follow_the_features() {
        let mut sb = vec![0u8; 2048];
        sb[1080..1082].copy_from_slice(&[0x53, 0xEF]);
        assert_eq!(identify(&sb), Some(FsKind::Ext(ExtVersion::Ext2)));
        sb[1024 + 0x5C] = 0x4;
        assert_eq!(identify(&sb), Some(FsKind::Ext(ExtVersion::Ext3)));
        sb[1024 + 0x60] = 0x40;
        assert_eq!(identify(&sb), Some(FsKind::Ext(ExtVersion::Ext4)));
    }
}
