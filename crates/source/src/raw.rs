//! Raw disk images and block devices.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::{BlockSource, SourceError};

/// A raw image file or a block device, opened read-only.
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawFile {
    /// Opens `path` read-only. Block devices are sized by seeking to their end.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source| SourceError::Open { path: path.clone(), source };
        // Read-only: no write, append, create or truncate flag is ever set here.
        let mut file = OpenOptions::new().read(true).open(&path).map_err(open_err)?;
        let ft = file.metadata().map_err(open_err)?.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(SourceError::NotADisk { path });
        }
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        Ok(RawFile { file, path, size })
    }
}

impl BlockSource for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn read_ranges(
        &mut self,
        ranges: &mut dyn Iterator<Item = (u64, usize)>,
        sink: &mut dyn FnMut(u64, Vec<u8>) -> bool,
    ) -> Result<(), SourceError> {
        for (offset, len) in ranges {
            if offset.checked_add(len as u64).is_none_or(|end| end > self.size) {
                return Err(SourceError::OutOfRange { what: self.describe(), offset, size: self.size });
            }
            let mut buf = vec![0u8; len];
            self.file.read_exact_at(&mut buf, offset).map_err(|source| SourceError::Read {
                what: self.describe(),
                offset,
                len,
                source,
            })?;
            if !sink(offset, buf) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_exact_ranges_and_refuses_past_end() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"0123456789").unwrap();
        let mut src = RawFile::open(f.path()).unwrap();
        assert_eq!(src.size(), 10);
        let mut buf = [0u8; 4];
        src.read_at(&mut buf, 3).unwrap();
        assert_eq!(&buf, b"3456");
        assert!(matches!(src.read_at(&mut buf, 8), Err(SourceError::OutOfRange { .. })));
    }

    #[test]
    fn shrinking_source_is_an_error_not_zeros() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[1u8; 100]).unwrap();
        let mut src = RawFile::open(f.path()).unwrap();
        f.as_file().set_len(10).unwrap();
        let mut buf = [0u8; 50];
        assert!(matches!(src.read_at(&mut buf, 20), Err(SourceError::Read { .. })));
    }

    #[test]
    fn directories_and_missing_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(RawFile::open(d.path()), Err(SourceError::NotADisk { .. })));
        assert!(matches!(RawFile::open(d.path().join("nope")), Err(SourceError::Open { .. })));
    }
}
