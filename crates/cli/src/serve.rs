//! `serve-nbd`: a snapshot's disks as read-only NBD exports, one per disk id.

use std::io;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use blockproof_core::image::DEFAULT_CACHE_BYTES;
use blockproof_core::DiskImage;
use blockproof_nbd::{Export, Exports};
use blockproof_repo::{BlobIndex, BlobReader};

use crate::args::ServeArgs;
use crate::commands::open_repo;
use crate::Usage;

/// A client connection, unix or TCP.
trait ReadWrite: io::Read + io::Write + Send {}

impl<T: io::Read + io::Write + Send> ReadWrite for T {}

struct ImageExport<'a>(DiskImage<'a>);

impl Export for ImageExport<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(buf, offset).map_err(|e| io::Error::other(e.to_string()))
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        self.0.allocation(offset, len).map_err(|e| io::Error::other(e.to_string()))
    }
}

pub fn serve_nbd(a: ServeArgs) -> Result<u8> {
    if a.socket.is_some() == a.listen.is_some() {
        return Err(Usage("give exactly one of --socket PATH and --listen HOST:PORT".into()).into());
    }
    let repo = open_repo(&a.repo)?;
    let info = repo.resolve_snapshot(&a.snapshot)?;
    let index = BlobIndex::load(&repo)?;
    let reader = BlobReader::new(&repo, &index);
    let cache = a.cache_mib.map_or(DEFAULT_CACHE_BYTES, |m| m << 20);
    let mut exports: Exports<'_> = Vec::new();
    for d in &info.snapshot.disks {
        if a.disk.as_ref().is_some_and(|want| want != &d.id) {
            continue;
        }
        if !d.mismatches.is_empty() {
            eprintln!(
                "blockproof: warning: disk {} of snapshot {} is tainted: {} range(s) differ from the source",
                d.id,
                info.id.short(),
                d.mismatches.len()
            );
        }
        exports.push((d.id.clone(), Arc::new(ImageExport(DiskImage::new(&reader, d, cache)?))));
    }
    if exports.is_empty() {
        bail!(Usage(format!("snapshot {} has no disk {:?}", info.id.short(), a.disk.unwrap_or_default())));
    }
    let names: Vec<&str> = exports.iter().map(|(n, _)| n.as_str()).collect();
    let serve_all = |streams: &mut dyn Iterator<Item = io::Result<Box<dyn ReadWrite>>>| -> Result<()> {
        std::thread::scope(|s| {
            for stream in streams {
                let mut stream = stream?;
                let exports = &exports;
                s.spawn(move || {
                    if let Err(e) = blockproof_nbd::serve(&mut stream, exports) {
                        eprintln!("blockproof: nbd client dropped: {e}");
                    }
                });
            }
            Ok(())
        })
    };
    let snap = info.id.short();
    if let Some(path) = &a.socket {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
        eprintln!(
            "serving snapshot {snap} read-only: exports {} on nbd+unix:///EXPORT?socket={} (Ctrl-C stops)",
            names.join(", "),
            path.display()
        );
        serve_all(&mut listener.incoming().map(|s| s.map(|s| Box::new(s) as Box<dyn ReadWrite>)))?;
    } else if let Some(addr) = &a.listen {
        let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!(
            "serving snapshot {snap} read-only: exports {} on nbd://{}/EXPORT (Ctrl-C stops)",
            names.join(", "),
            listener.local_addr()?
        );
        serve_all(&mut listener.incoming().map(|s| {
            s.map(|s| {
                let _ = s.set_nodelay(true);
                Box::new(s) as Box<dyn ReadWrite>
            })
        }))?;
    }
    Ok(crate::exit::OK)
}
