//! The basis of a set of blob lookups: the index files in which every blob found was
//! listed ([`IndexBasis`]), and the documents that carry one.
//!
//! A backup records, beside what it stored, the basis of its lookups: a confirmation
//! group list carries one after its groups ([`crate::confirm::encode_groups`], version
//! 3), and a **tree basis** document ([`encode_tree_basis`]) names the root of the data
//! tree a backup committed for a disk with the basis on which every blob that tree
//! references was found or written. A later backup whose index still holds every one of
//! those files, whole, finds those blobs too, and skips the lookups.

use crate::{FormatError, Id, Reader};

/// Index files a basis names one by one at most.
pub const BASIS_FILES: usize = 1024;

/// The magic and version opening a tree basis document.
pub const TREE_BASIS_MAGIC: &[u8; 4] = b"BPTB";
pub const TREE_BASIS_VERSION: u16 = 1;

/// The index files a set of lookups rests on: the first `cached` files of the local
/// blob-index cache (in the cache's order, which only ever appends while no file it
/// covers is removed), known by a digest of their ids, and `files` by id (those the
/// process read beside the cache, and those it wrote). Every blob found in those lookups
/// is listed in one of these files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexBasis {
    pub cached: u32,
    /// BLAKE3 of the ids of the cache's first `cached` index files, in order.
    pub digest: [u8; 32],
    pub files: Vec<Id>,
}

impl IndexBasis {
    /// Appends `cached u32 | digest (32) | n u32 | n × file id (32)`, little-endian.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.cached.to_le_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&(self.files.len() as u32).to_le_bytes());
        for f in &self.files {
            out.extend_from_slice(&f.0);
        }
    }

    /// Reads what [`IndexBasis::encode_into`] wrote; more than [`BASIS_FILES`] files is an
    /// error.
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<Self, FormatError> {
        let (cached, digest, n) = (r.u32()?, r.array()?, r.u32()? as usize);
        if n > BASIS_FILES {
            return Err(r.malformed(format!("a basis of {n} index files")));
        }
        let files = (0..n).map(|_| r.array().map(Id)).collect::<Result<_, _>>()?;
        Ok(IndexBasis { cached, digest, files })
    }
}

/// Encodes a tree basis: `"BPTB" | version u16 (1) | root (32)`, then the basis.
pub fn encode_tree_basis(root: Id, basis: &IndexBasis) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 2 + 32 + 40 + basis.files.len() * 32);
    out.extend_from_slice(TREE_BASIS_MAGIC);
    out.extend_from_slice(&TREE_BASIS_VERSION.to_le_bytes());
    out.extend_from_slice(&root.0);
    basis.encode_into(&mut out);
    out
}

/// Decodes a tree basis: the data tree's root and its basis.
pub fn decode_tree_basis(buf: &[u8]) -> Result<(Id, IndexBasis), FormatError> {
    let mut r = Reader::new(buf, "tree basis");
    if &r.array::<4>()? != TREE_BASIS_MAGIC {
        return Err(r.malformed("bad magic"));
    }
    let version = r.u16()?;
    if version != TREE_BASIS_VERSION {
        return Err(r.malformed(format!("version {version}")));
    }
    let root = Id(r.array()?);
    let basis = IndexBasis::decode_from(&mut r)?;
    r.finish()?;
    Ok((root, basis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_basis_is_pinned() {
        let basis = IndexBasis { cached: 3, digest: [5; 32], files: vec![Id([6; 32])] };
        let enc = encode_tree_basis(Id([9; 32]), &basis);
        let mut want = b"BPTB\x01\x00".to_vec();
        want.extend_from_slice(&[9; 32]);
        want.extend_from_slice(&[3, 0, 0, 0]);
        want.extend_from_slice(&[5; 32]);
        want.extend_from_slice(&[1, 0, 0, 0]);
        want.extend_from_slice(&[6; 32]);
        assert_eq!(enc, want);
        assert_eq!(decode_tree_basis(&enc).unwrap(), (Id([9; 32]), basis));
        assert!(decode_tree_basis(&enc[..enc.len() - 1]).is_err(), "cut short");
        let mut longer = enc.clone();
        longer.push(0);
        assert!(decode_tree_basis(&longer).is_err(), "bytes after the basis");
        let mut other = enc.clone();
        other[4] = 2;
        assert!(decode_tree_basis(&other).is_err(), "another version");
        other = enc.clone();
        other[0] = b'X';
        assert!(decode_tree_basis(&other).is_err(), "another magic");
    }
}
