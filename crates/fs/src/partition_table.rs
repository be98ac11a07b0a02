//! GPT and MBR partition tables.
//!
//! GPT is read with the `gpt` crate (headers and entry array, both CRC-checked), with
//! two guards it lacks: the entry size must be 128 bytes (the crate asserts it, which
//! would panic) and the entry array must be of a sane size and inside the disk (the crate
//! allocates it whole). A damaged primary header or entry array falls back to the backup
//! at the end of the disk. Logical block sizes 512 and 4096 are tried.
//!
//! The MBR is parsed here: four 16-byte entries and, for an extended partition, the
//! chain of EBRs (logical partitions numbered from 5, as Linux does). Offsets are
//! `u32` sectors of 512 bytes; the chain must move forward and is capped, so a damaged
//! or looping chain ends in an error.

use std::sync::Arc;

use gpt::disk::LogicalBlockSize;
use gpt::header::{read_header_from_arbitrary_device, Header};

use crate::disk::{Partition, TableKind};
use crate::error::FsError;
use crate::window::Window;
use crate::ReadAt;

/// Most GPT entries accepted (the usual array has 128; 4096 is 512 KiB).
const MAX_GPT_ENTRIES: u32 = 4096;
/// Most logical partitions followed in an EBR chain.
const MAX_LOGICAL: u32 = 256;
const SECTOR: u64 = 512;

/// The partitions of a GPT disk, `None` when the disk has no GPT.
pub(crate) fn read_gpt(src: &Arc<dyn ReadAt>) -> Result<Option<(TableKind, Vec<Partition>)>, FsError> {
    let size = src.size();
    let mut w = Window::new(src.clone(), 0, size);
    let protective = read_mbr_sector(&mut w, 0)?.is_some_and(|s| entries(&s).iter().any(|e| e.kind == 0xEE));
    let mut problems = Vec::new();
    for (lb, lb_size) in [(LogicalBlockSize::Lb512, 512u64), (LogicalBlockSize::Lb4096, 4096)] {
        let primary_sig = has_signature(&mut w, lb_size);
        // The backup header is the disk's last block: seen from a window that starts
        // two blocks before the end, it is where the crate looks for a primary (block 1).
        let backup_at = size.checked_sub(2 * lb_size).map(|a| a - a % lb_size);
        let backup_sig =
            backup_at.is_some_and(|at| has_signature(&mut Window::new(src.clone(), at, 2 * lb_size), lb_size));
        if !primary_sig && !backup_sig {
            continue;
        }
        let mut headers = Vec::new();
        if primary_sig {
            match read_header_from_arbitrary_device(&mut w, lb) {
                Ok(h) => headers.push(("primary", h)),
                Err(e) => problems.push(format!("primary GPT header: {e}")),
            }
        }
        if let Some(at) = backup_at.filter(|_| backup_sig) {
            match read_header_from_arbitrary_device(&mut Window::new(src.clone(), at, 2 * lb_size), lb) {
                Ok(h) => headers.push(("backup", h)),
                Err(e) => problems.push(format!("backup GPT header: {e}")),
            }
        }
        for (which, header) in headers {
            match gpt_entries(&mut w, &header, lb, lb_size, size) {
                Ok(parts) => return Ok(Some((TableKind::Gpt, parts))),
                Err(FsError::PartitionTable(why)) => problems.push(format!("{which} GPT entries: {why}")),
                Err(other) => return Err(other),
            }
        }
    }
    if problems.is_empty() && !protective {
        return Ok(None);
    }
    if problems.is_empty() {
        problems.push("a protective MBR but no GPT header".to_string());
    }
    Err(FsError::PartitionTable(problems.join("; ")))
}

fn has_signature(w: &mut Window, lb_size: u64) -> bool {
    let mut sig = [0u8; 8];
    w.read_exact_at(&mut sig, lb_size).is_ok() && &sig == b"EFI PART"
}

fn gpt_entries(
    w: &mut Window,
    header: &Header,
    lb: LogicalBlockSize,
    lb_size: u64,
    disk_size: u64,
) -> Result<Vec<Partition>, FsError> {
    let bad = |why: String| Err(FsError::PartitionTable(why));
    if header.part_size != 128 {
        return bad(format!("entries of {} bytes (only 128 is supported)", header.part_size));
    }
    if header.num_parts > MAX_GPT_ENTRIES {
        return bad(format!("{} entries (at most {MAX_GPT_ENTRIES} are accepted)", header.num_parts));
    }
    let array_end =
        header.part_start.checked_mul(lb_size).and_then(|s| s.checked_add(u64::from(header.num_parts) * 128));
    if array_end.is_none_or(|end| end > disk_size) {
        return bad(format!("the entry array at block {} is beyond the end of the disk", header.part_start));
    }
    let table = gpt::partition::file_read_partitions(w, header, lb).map_err(|e| FsError::from_io("GPT", e))?;
    let mut parts = Vec::new();
    for (index, p) in table.into_iter().filter(|(_, p)| p.is_used()) {
        let span =
            p.last_lba.checked_sub(p.first_lba).and_then(|n| n.checked_add(1)).and_then(|n| n.checked_mul(lb_size));
        let (Some(start), Some(size)) = (p.first_lba.checked_mul(lb_size), span) else {
            continue; // an entry that ends before it starts: nothing to read
        };
        let guid = p.part_type_guid.guid.to_string().to_uppercase();
        parts.push(Partition {
            index,
            start,
            size,
            type_name: gpt_type_name(&guid).to_string(),
            type_id: guid,
            name: Some(p.name).filter(|n| !n.is_empty()),
            filesystem: None,
        });
    }
    Ok(parts)
}

fn gpt_type_name(guid: &str) -> &'static str {
    match guid {
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915" => "Linux home",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI System",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery environment",
        _ => "unknown",
    }
}

/// One MBR or EBR partition entry.
#[derive(Clone, Copy, Debug)]
struct MbrEntry {
    boot: u8,
    kind: u8,
    lba: u32,
    sectors: u32,
}

/// The 512-byte sector at `lba` if it ends in the `0x55AA` signature.
fn read_mbr_sector(w: &mut Window, lba: u64) -> Result<Option<[u8; 512]>, FsError> {
    let mut s = [0u8; 512];
    if lba.checked_mul(SECTOR).and_then(|o| o.checked_add(SECTOR)).is_none_or(|end| end > w.len()) {
        return Ok(None);
    }
    w.read_exact_at(&mut s, lba * SECTOR).map_err(|e| FsError::from_io("MBR", e))?;
    Ok((s[510..] == [0x55, 0xAA]).then_some(s))
}

fn entries(sector: &[u8; 512]) -> [MbrEntry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[446 + 16 * i..462 + 16 * i];
        MbrEntry {
            boot: e[0],
            kind: e[4],
            lba: u32::from_le_bytes([e[8], e[9], e[10], e[11]]),
            sectors: u32::from_le_bytes([e[12], e[13], e[14], e[15]]),
        }
    })
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0F | 0x85)
}

/// The partitions of an MBR disk, `None` when sector 0 is not a plausible MBR.
pub(crate) fn read_mbr(src: &Arc<dyn ReadAt>) -> Result<Option<(TableKind, Vec<Partition>)>, FsError> {
    let mut w = Window::new(src.clone(), 0, src.size());
    let Some(sector) = read_mbr_sector(&mut w, 0)? else { return Ok(None) };
    let primary = entries(&sector);
    let used = |e: &MbrEntry| e.kind != 0 && e.sectors != 0 && e.lba != 0;
    if primary.iter().any(|e| e.boot != 0 && e.boot != 0x80) || !primary.iter().any(used) {
        return Ok(None);
    }
    let mut parts = Vec::new();
    let mut next_logical = 5;
    for (i, e) in primary.iter().enumerate().filter(|(_, e)| used(e)) {
        if is_extended(e.kind) {
            read_logical(&mut w, e, &mut next_logical, &mut parts)?;
        } else {
            parts.push(mbr_partition(i as u32 + 1, u64::from(e.lba), e));
        }
    }
    Ok(Some((TableKind::Mbr, parts)))
}

/// Follows the EBR chain of the extended partition `ext`.
fn read_logical(w: &mut Window, ext: &MbrEntry, next: &mut u32, parts: &mut Vec<Partition>) -> Result<(), FsError> {
    let base = u64::from(ext.lba);
    let mut rel = 0u64;
    for _ in 0..MAX_LOGICAL {
        let Some(ebr) = read_mbr_sector(w, base + rel)? else {
            if rel == 0 {
                return Ok(()); // an empty extended partition needs no EBR
            }
            return Err(FsError::PartitionTable(format!("no EBR signature at sector {}", base + rel)));
        };
        let [logical, link, ..] = entries(&ebr);
        if logical.kind != 0 && logical.sectors != 0 {
            parts.push(mbr_partition(*next, base + rel + u64::from(logical.lba), &logical));
            *next += 1;
        }
        if link.kind == 0 || link.lba == 0 {
            return Ok(());
        }
        if u64::from(link.lba) <= rel {
            return Err(FsError::PartitionTable(format!("the EBR chain goes backwards at sector {}", base + rel)));
        }
        rel = u64::from(link.lba);
    }
    Err(FsError::PartitionTable(format!("more than {MAX_LOGICAL} logical partitions")))
}

fn mbr_partition(index: u32, lba: u64, e: &MbrEntry) -> Partition {
    Partition {
        index,
        start: lba * SECTOR,
        size: u64::from(e.sectors) * SECTOR,
        type_id: format!("0x{:02x}", e.kind),
        type_name: mbr_type_name(e.kind).to_string(),
        name: None,
        filesystem: None,
    }
}

fn mbr_type_name(kind: u8) -> &'static str {
    match kind {
        0x01 => "FAT12",
        0x04 | 0x06 => "FAT16",
        0x0E => "W95 FAT16 (LBA)",
        0x0B => "W95 FAT32",
        0x0C => "W95 FAT32 (LBA)",
        0x07 => "HPFS/NTFS/exFAT",
        0x27 => "Hidden NTFS WinRE",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8E => "Linux LVM",
        0xFD => "Linux raid autodetect",
        0xEF => "EFI (FAT-12/16/32)",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(sector: &mut [u8], slot: usize, boot: u8, kind: u8, lba: u32, sectors: u32) {
        let e = &mut sector[446 + 16 * slot..462 + 16 * slot];
        e[0] = boot;
        e[4] = kind;
        e[8..12].copy_from_slice(&lba.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
    }

    fn sign(disk: &mut [u8], lba: usize) {
        disk[lba * 512 + 510..lba * 512 + 512].copy_from_slice(&[0x55, 0xAA]);
    }

    #[test]
    fn primary_and_logical_partitions_are_numbered_like_linux() {
        let mut disk = vec![0u8; 4096 * 512];
        put(&mut disk, 0, 0x80, 0x83, 2048, 100);
        put(&mut disk, 1, 0, 0x05, 3000, 1000);
        sign(&mut disk, 0);
        // First EBR at 3000: a logical partition 10 sectors on, then the next EBR at +200.
        put(&mut disk[3000 * 512..], 0, 0, 0x07, 10, 50);
        put(&mut disk[3000 * 512..], 1, 0, 0x05, 200, 100);
        sign(&mut disk, 3000);
        put(&mut disk[3200 * 512..], 0, 0, 0x0C, 8, 20);
        sign(&mut disk, 3200);
        let src: Arc<dyn ReadAt> = Arc::new(disk);
        let (kind, parts) = read_mbr(&src).unwrap().unwrap();
        assert_eq!(kind, TableKind::Mbr);
        let got: Vec<(u32, u64, u64, &str)> =
            parts.iter().map(|p| (p.index, p.start, p.size, p.type_id.as_str())).collect();
        assert_eq!(
            got,
            [(1, 2048 * 512, 100 * 512, "0x83"), (5, 3010 * 512, 50 * 512, "0x07"), (6, 3208 * 512, 20 * 512, "0x0c")]
        );
        assert!(read_gpt(&src).unwrap().is_none());
    }

    #[test]
    fn a_looping_ebr_chain_is_an_error() {
        let mut disk = vec![0u8; 4096 * 512];
        put(&mut disk, 0, 0, 0x0F, 1000, 2000);
        sign(&mut disk, 0);
        put(&mut disk[1100 * 512..], 1, 0, 0x05, 100, 10); // points at itself
        sign(&mut disk, 1000);
        put(&mut disk[1000 * 512..], 1, 0, 0x05, 100, 10);
        sign(&mut disk, 1100);
        let src: Arc<dyn ReadAt> = Arc::new(disk);
        assert!(matches!(read_mbr(&src), Err(FsError::PartitionTable(_))));
    }

    #[test]
    fn boot_code_is_not_an_mbr() {
        let mut disk = vec![0x33u8; 64 * 512];
        sign(&mut disk, 0);
        let src: Arc<dyn ReadAt> = Arc::new(disk);
        assert!(read_mbr(&src).unwrap().is_none());
    }

    /// A GPT written by the `gpt` crate itself on a disk of 4096-byte blocks.
    fn gpt_4k(damage_primary: bool) -> Arc<dyn ReadAt> {
        use gpt::{partition_types, GptConfig};
        let device = std::io::Cursor::new(vec![0u8; 8 << 20]);
        let mut disk = GptConfig::new()
            .writable(true)
            .logical_block_size(LogicalBlockSize::Lb4096)
            .create_from_device(device, None)
            .unwrap();
        disk.add_partition("data", 1 << 20, partition_types::LINUX_FS, 0, None).unwrap();
        let mut bytes = disk.write().unwrap().into_inner();
        if damage_primary {
            bytes[4096 + 40] ^= 0xFF;
        }
        Arc::new(bytes)
    }

    #[test]
    fn gpt_on_4096_byte_blocks_and_its_backup_header() {
        for damage in [false, true] {
            let (kind, parts) = read_gpt(&gpt_4k(damage)).unwrap().unwrap();
            assert_eq!(kind, TableKind::Gpt);
            assert_eq!(parts.len(), 1, "damaged primary: {damage}");
            let p = &parts[0];
            assert_eq!((p.index, p.size, p.start % 4096), (1, 1 << 20, 0));
            assert_eq!((p.type_name.as_str(), p.name.as_deref()), ("Linux filesystem", Some("data")));
        }
    }

    #[test]
    fn a_protective_mbr_without_gpt_is_damage() {
        let mut disk = vec![0u8; 64 * 512];
        put(&mut disk, 0, 0, 0xEE, 1, 63);
        sign(&mut disk, 0);
        let src: Arc<dyn ReadAt> = Arc::new(disk);
        assert!(matches!(read_gpt(&src), Err(FsError::PartitionTable(_))));
    }
}
