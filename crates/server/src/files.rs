//! Small durable files of the server's state directory.

use std::io::Write;
use std::path::Path;

use crate::ServerError;

/// Writes `path` atomically and durably: a temporary file beside it, `fsync`, `rename`,
/// `fsync` of the directory. Readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ServerError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| ServerError::io(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| ServerError::io(path, e))
}
