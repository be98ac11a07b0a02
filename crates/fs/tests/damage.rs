//! Damaged disks give errors, never panics or hangs: truncated images, garbage, and
//! real filesystems with bytes of their metadata flipped (a small, deterministic fuzz).

mod common;

use std::collections::HashMap;
use std::io;

use blockproof_fs::{Disk, EntryKind, FsError, FsPath, ImageFile, ReadAt};
use common::disk_image::{random_bytes, PARTITIONS};
use common::image;

/// The real disk, seen through a size limit and a set of flipped bytes.
struct Damaged {
    inner: ImageFile,
    size: u64,
    /// Disk offset -> XOR mask.
    flips: HashMap<u64, u8>,
}

impl Damaged {
    fn new(size: Option<u64>) -> Damaged {
        let inner = ImageFile::open(&image("damage").image).unwrap();
        let size = size.unwrap_or(inner.size()).min(inner.size());
        Damaged { inner, size, flips: HashMap::new() }
    }
}

impl ReadAt for Damaged {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "beyond the end of the truncated image"));
        }
        self.inner.read_at(buf, offset)?;
        for (&at, &mask) in &self.flips {
            if let Some(i) = at.checked_sub(offset).filter(|&i| i < buf.len() as u64) {
                buf[i as usize] ^= mask;
            }
        }
        Ok(())
    }
}

/// One-line errors only.
fn check(err: &FsError) {
    let text = err.to_string();
    assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
}

/// Lists and reads everything reachable (bounded), tolerating every error; returns how
/// many files were read completely.
fn walk(disk: &Disk) -> usize {
    let mut read = 0;
    for p in disk.partitions() {
        let fs = match disk.open_filesystem(Some(p.index)) {
            Ok(fs) => fs,
            Err(e) => {
                check(&e);
                continue;
            }
        };
        let _ = fs.label();
        let mut stack = vec![(FsPath::root(), 0)];
        while let Some((dir, depth)) = stack.pop() {
            let entries = match fs.list(dir.to_bytes()) {
                Ok(entries) => entries,
                Err(e) => {
                    check(&e);
                    continue;
                }
            };
            for e in entries.into_iter().take(64) {
                match e.kind {
                    EntryKind::Dir if depth < 6 => stack.push((e.path, depth + 1)),
                    EntryKind::File => match fs.read(e.path.to_bytes(), &mut io::sink()) {
                        Ok(_) => read += 1,
                        Err(e) => check(&e),
                    },
                    EntryKind::Symlink => {
                        let _ = fs.read_link(e.path.to_bytes()).map_err(|e| check(&e));
                    }
                    _ => {}
                }
            }
        }
    }
    read
}

#[test]
fn truncated_images_give_errors_not_panics() {
    let whole = walk(&Disk::open(Box::new(Damaged::new(None))).unwrap());
    assert!(whole >= 16, "the undamaged disk reads {whole} files");
    // Cut inside the GPT, inside each filesystem, and just before the backup GPT.
    let mib = 1 << 20;
    for cut in [0, 700, 20 << 10, mib + 4096, 50 * mib, 170 * mib, 250 * mib, 400 * mib, 512 * mib - 4096] {
        match Disk::open(Box::new(Damaged::new(Some(cut)))) {
            Ok(disk) => {
                walk(&disk);
            }
            Err(e) => check(&e),
        }
    }
    // A disk cut just after the NTFS boot sector still lists the partition, and opening
    // it says why not.
    let disk = Disk::open(Box::new(Damaged::new(Some(PARTITIONS[2].0 * 512 + 4096)))).unwrap();
    assert_eq!(disk.partitions().len(), 3);
    let err = disk.open_filesystem(Some(3)).unwrap_err();
    assert!(matches!(err, FsError::Read { .. } | FsError::Corrupt { .. }), "{err}");
    check(&err);
}

#[test]
fn garbage_is_no_filesystem() {
    for seed in 0..4 {
        let mut bytes = random_bytes(4 << 20, seed);
        if seed % 2 == 1 {
            bytes[510] = 0x55;
            bytes[511] = 0xAA;
        }
        match Disk::open(Box::new(bytes)) {
            Err(FsError::NoFilesystem) => {}
            Ok(disk) => panic!("garbage seen as {disk:?}"),
            Err(e) => check(&e),
        }
    }
}

#[test]
fn flipped_metadata_bytes_never_panic() {
    let mib = 1u64 << 20;
    let img = ImageFile::open(&image("damage").image).unwrap();
    // Where each filesystem keeps what matters: its first MiBs (superblock, group
    // descriptors, bitmaps, inode tables, directories; boot sector, FATs, root directory),
    // and for NTFS also the MFT, wherever its boot sector puts it.
    let mut regions: Vec<(u64, u64)> = PARTITIONS.iter().map(|(start, _)| (start * 512, 8 * mib)).collect();
    let ntfs_start = PARTITIONS[2].0 * 512;
    let mut boot = [0u8; 512];
    img.read_at(&mut boot, ntfs_start).unwrap();
    let cluster = u64::from(u16::from_le_bytes([boot[11], boot[12]])) * u64::from(boot[13]);
    let mft = u64::from_le_bytes(boot[48..56].try_into().unwrap()) * cluster;
    regions.push((ntfs_start + mft, mib));

    let mut affected = 0;
    for (r, &(start, len)) in regions.iter().enumerate() {
        // Flip bytes that are in use (not zero), so most flips hit metadata.
        let mut bytes = vec![0u8; len as usize];
        img.read_at(&mut bytes, start).unwrap();
        let used: Vec<u64> = (0..len).filter(|&i| bytes[i as usize] != 0).collect();
        for seed in 0..40u64 {
            let noise = random_bytes(16 * 8, seed * 31 + r as u64 + 1);
            let mut disk = Damaged::new(None);
            for pair in noise.chunks(16).take(1 + seed as usize % 8) {
                let pick = u64::from_le_bytes(pair[..8].try_into().unwrap()) % used.len() as u64;
                disk.flips.insert(start + used[pick as usize], pair[8] | 1);
            }
            match Disk::open(Box::new(disk)) {
                Ok(disk) => affected += usize::from(walk(&disk) < 16),
                Err(e) => check(&e),
            }
        }
    }
    // The point is that nothing panicked or hung; that the damage mattered is a sanity check.
    assert!(affected >= 8, "only {affected} of 160 damaged disks read differently");
}
