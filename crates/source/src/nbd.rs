//! NBD exports as block sources.

use blockproof_nbd::{dirty_bitmap_context, ranges_where, Client, ClientOptions, Error, Extent, Uri, BASE_ALLOCATION};

use crate::{BlockSource, QemuNbd, SourceError};

/// An NBD export, read with several requests in flight. When blockproof started the
/// server for an image file, the source owns it: dropping the source stops it.
pub struct NbdSource {
    client: Client,
    what: String,
    /// The dirty bitmap negotiated, if any.
    bitmap: Option<String>,
    allocation: bool,
    /// Held only to be dropped; declared last, so the connection closes before the
    /// server stops.
    _server: Option<QemuNbd>,
}

/// How a dirty bitmap request turned out.
pub enum BitmapOutcome {
    /// Exported: changes can be read with [`NbdSource::dirty_ranges`].
    Granted,
    /// The server does not export it: a full read, for this reason.
    Missing(String),
}

impl NbdSource {
    /// Connects to `uri`, negotiating `base:allocation` when offered and the dirty bitmap
    /// `bitmap` if asked. A bitmap the server does not export is not an error: the
    /// connection is made without it and the outcome says why.
    pub fn connect(
        uri: &Uri,
        what: String,
        bitmap: Option<&str>,
        server: Option<QemuNbd>,
    ) -> Result<(NbdSource, BitmapOutcome), SourceError> {
        let err = |source| SourceError::Nbd { what: what.clone(), source };
        let mut contexts = vec![BASE_ALLOCATION.to_string()];
        if let Some(b) = bitmap {
            contexts.push(dirty_bitmap_context(b));
        }
        let attempt =
            |contexts: Vec<String>| Client::connect(uri, ClientOptions { contexts, ..ClientOptions::default() });
        let mut outcome = BitmapOutcome::Granted;
        let mut allocation = true;
        let client = match attempt(contexts) {
            Ok(c) => c,
            Err(Error::BitmapNotFound { bitmap: b, .. }) => {
                outcome = BitmapOutcome::Missing(format!("the NBD server does not export dirty bitmap {b:?}"));
                Self::without(uri, vec![BASE_ALLOCATION.into()], &mut allocation).map_err(err)?
            }
            Err(Error::ContextNotGranted { .. } | Error::MetaContextsUnsupported { .. }) => {
                // No base:allocation (or no meta contexts at all): read everything.
                let mut ctx = Vec::new();
                if let Some(b) = bitmap {
                    ctx.push(dirty_bitmap_context(b));
                }
                allocation = false;
                match attempt(ctx) {
                    Ok(c) => c,
                    Err(e @ (Error::BitmapNotFound { .. } | Error::MetaContextsUnsupported { .. })) => {
                        outcome = BitmapOutcome::Missing(format!("{e}"));
                        attempt(Vec::new()).map_err(err)?
                    }
                    Err(e) => return Err(err(e)),
                }
            }
            Err(e) => return Err(err(e)),
        };
        let bitmap = match outcome {
            BitmapOutcome::Granted => bitmap.map(str::to_string),
            BitmapOutcome::Missing(_) => None,
        };
        crate::check_disk_size(&what, client.size(), None)?;
        Ok((NbdSource { client, what, bitmap, allocation, _server: server }, outcome))
    }

    fn without(uri: &Uri, contexts: Vec<String>, allocation: &mut bool) -> Result<Client, Error> {
        match Client::connect(uri, ClientOptions { contexts, ..ClientOptions::default() }) {
            Err(Error::ContextNotGranted { .. } | Error::MetaContextsUnsupported { .. }) => {
                *allocation = false;
                Client::connect(uri, ClientOptions::default())
            }
            r => r,
        }
    }

    /// The ranges the negotiated dirty bitmap marks dirty (sorted, merged).
    pub fn dirty_ranges(&mut self) -> Result<Vec<(u64, u64)>, SourceError> {
        let Some(bitmap) = self.bitmap.clone() else {
            return Err(SourceError::Invalid(format!("{}: no dirty bitmap was negotiated", self.what)));
        };
        let size = self.client.size();
        let extents = self
            .client
            .extents(&dirty_bitmap_context(&bitmap), 0, size)
            .map_err(|source| SourceError::Nbd { what: self.what.clone(), source })?;
        Ok(ranges_where(&extents, Extent::is_dirty))
    }

    /// Connections re-established after a drop.
    pub fn reconnects(&self) -> u64 {
        self.client.reconnects()
    }
}

impl BlockSource for NbdSource {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn describe(&self) -> String {
        self.what.clone()
    }

    fn read_ranges(
        &mut self,
        ranges: &mut dyn Iterator<Item = (u64, usize)>,
        sink: &mut dyn FnMut(u64, Vec<u8>) -> bool,
    ) -> Result<(), SourceError> {
        let size = self.client.size();
        let mut bad = None;
        // Fused: after an out-of-range request nothing more is read (map_while alone
        // would go on with the ranges after it if asked again).
        let checked = ranges
            .map_while(|(o, l)| {
                if o.checked_add(l as u64).is_none_or(|end| end > size) {
                    bad = Some(o);
                    None
                } else {
                    Some((o, l))
                }
            })
            .fuse();
        for r in self.client.reads(checked) {
            let (offset, data) = r.map_err(|source| SourceError::Nbd { what: self.what.clone(), source })?;
            if !sink(offset, data) {
                return Ok(());
            }
        }
        match bad {
            Some(offset) => Err(SourceError::OutOfRange { what: self.what.clone(), offset, size }),
            None => Ok(()),
        }
    }

    fn zero_ranges(&mut self) -> Result<Vec<(u64, u64)>, SourceError> {
        if !self.allocation {
            return Ok(Vec::new());
        }
        let size = self.client.size();
        let extents = self
            .client
            .extents(BASE_ALLOCATION, 0, size)
            .map_err(|source| SourceError::Nbd { what: self.what.clone(), source })?;
        Ok(ranges_where(&extents, Extent::is_zero))
    }
}
