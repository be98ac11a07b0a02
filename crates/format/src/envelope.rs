//! The envelope every repository file starts with: a 4-byte magic and a format version.
//!
//! Files sealed as a whole (index and snapshot files) are `magic | version | sealed`,
//! where `sealed` is `nonce | ciphertext | tag` and the 6 header bytes are the AEAD's
//! associated data, so an object of one kind cannot be passed off as another.

use crate::{FormatError, Reader, FORMAT_VERSION, LAYOUT_VERSION, MIN_FORMAT_VERSION, SEAL_OVERHEAD};

/// The magic numbers of the repository's files (pinned by tests and docs/FORMAT.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectMagic {
    /// `config`: repository id and encrypted settings.
    Config,
    /// `keys/*`: a key slot.
    KeySlot,
    /// `data/*/*`: a pack of blobs.
    Pack,
    /// `index/*`: an index of packs.
    Index,
    /// `snapshots/*`: a snapshot manifest.
    Snapshot,
    /// `locks/*`: a repository lock.
    Lock,
    /// `state/*`: a small mutable document (gc plan, protection marker).
    State,
}

impl ObjectMagic {
    pub const fn bytes(self) -> [u8; 4] {
        match self {
            ObjectMagic::Config => *b"BPRC",
            ObjectMagic::KeySlot => *b"BPKS",
            ObjectMagic::Pack => *b"BPPK",
            ObjectMagic::Index => *b"BPIX",
            ObjectMagic::Snapshot => *b"BPSN",
            ObjectMagic::Lock => *b"BPLK",
            ObjectMagic::State => *b"BPST",
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ObjectMagic::Config => "repository config",
            ObjectMagic::KeySlot => "key slot",
            ObjectMagic::Pack => "pack file",
            ObjectMagic::Index => "index file",
            ObjectMagic::Snapshot => "snapshot file",
            ObjectMagic::Lock => "lock file",
            ObjectMagic::State => "state file",
        }
    }

    /// The 6 header bytes of a file of this kind: magic and [`LAYOUT_VERSION`]. (The
    /// config's header carries the repository's version instead: [`Self::header_with`].)
    pub fn header(self) -> [u8; 6] {
        self.header_with(LAYOUT_VERSION)
    }

    /// Magic and an explicit version.
    pub fn header_with(self, version: u16) -> [u8; 6] {
        let mut h = [0u8; 6];
        h[..4].copy_from_slice(&self.bytes());
        h[4..].copy_from_slice(&version.to_le_bytes());
        h
    }

    /// The versions a reader accepts in a header of this kind: the repository versions
    /// for the config, the layout version for every other file.
    fn readable(self) -> std::ops::RangeInclusive<u16> {
        match self {
            ObjectMagic::Config => MIN_FORMAT_VERSION..=FORMAT_VERSION,
            _ => LAYOUT_VERSION..=LAYOUT_VERSION,
        }
    }

    /// Checks the magic and version at the start of `buf`; returns the bytes after them.
    pub fn check(self, buf: &[u8]) -> Result<&[u8], FormatError> {
        self.check_version(buf).map(|(_, rest)| rest)
    }

    /// Like [`Self::check`], also returning the version found.
    pub fn check_version(self, buf: &[u8]) -> Result<(u16, &[u8]), FormatError> {
        let mut r = Reader::new(buf, self.name());
        let magic: [u8; 4] = r.array()?;
        if magic != self.bytes() {
            return Err(FormatError::BadMagic { what: self.name() });
        }
        let version = r.u16()?;
        if !self.readable().contains(&version) {
            return Err(FormatError::UnsupportedVersion { what: self.name(), version, readable: self.readable() });
        }
        Ok((version, &buf[6..]))
    }
}

/// A whole-file sealed object: header followed by one AEAD-sealed payload.
pub struct Envelope;

impl Envelope {
    /// Builds the file bytes from the sealed payload (sealed with `magic.header()` as AD).
    pub fn encode(magic: ObjectMagic, sealed: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + sealed.len());
        out.extend_from_slice(&magic.header());
        out.extend_from_slice(sealed);
        out
    }

    /// Splits file bytes into (associated data, sealed payload) after checking the header.
    pub fn decode(magic: ObjectMagic, file: &[u8]) -> Result<(&[u8], &[u8]), FormatError> {
        let sealed = magic.check(file)?;
        if sealed.len() < SEAL_OVERHEAD {
            return Err(FormatError::Truncated { what: magic.name(), needed: 6 + SEAL_OVERHEAD, have: file.len() });
        }
        Ok((&file[..6], sealed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_are_pinned() {
        // Changing any of these breaks every existing repository: bump FORMAT_VERSION and
        // keep a reader for the old layout instead.
        assert_eq!(&ObjectMagic::Config.bytes(), b"BPRC");
        assert_eq!(&ObjectMagic::KeySlot.bytes(), b"BPKS");
        assert_eq!(&ObjectMagic::Pack.bytes(), b"BPPK");
        assert_eq!(&ObjectMagic::Index.bytes(), b"BPIX");
        assert_eq!(&ObjectMagic::Snapshot.bytes(), b"BPSN");
        assert_eq!(&ObjectMagic::Lock.bytes(), b"BPLK");
        assert_eq!(&ObjectMagic::State.bytes(), b"BPST");
        assert_eq!(FORMAT_VERSION, 4);
        assert_eq!(MIN_FORMAT_VERSION, 1);
        assert_eq!(LAYOUT_VERSION, 1);
        assert_eq!(ObjectMagic::Index.header(), [b'B', b'P', b'I', b'X', 1, 0]);
        assert_eq!(ObjectMagic::Config.header_with(2), [b'B', b'P', b'R', b'C', 2, 0]);
    }

    #[test]
    fn decode_checks_magic_version_and_length() {
        let f = Envelope::encode(ObjectMagic::Index, &[7u8; 40]);
        let (ad, sealed) = Envelope::decode(ObjectMagic::Index, &f).unwrap();
        assert_eq!(ad, &ObjectMagic::Index.header());
        assert_eq!(sealed.len(), 40);
        assert_eq!(
            Envelope::decode(ObjectMagic::Snapshot, &f).unwrap_err(),
            FormatError::BadMagic { what: "snapshot file" }
        );
        let mut v2 = f.clone();
        v2[4] = 2;
        assert!(matches!(
            Envelope::decode(ObjectMagic::Index, &v2),
            Err(FormatError::UnsupportedVersion { version: 2, .. })
        ));
        // The message names what this build reads in that kind of file.
        let err = Envelope::decode(ObjectMagic::Index, &v2).unwrap_err().to_string();
        assert!(err.ends_with("(this build reads version 1)"), "{err}");
        let mut config = ObjectMagic::Config.header_with(5).to_vec();
        config.extend_from_slice(&[0; 80]);
        let err = ObjectMagic::Config.check(&config).unwrap_err().to_string();
        assert!(err.ends_with("(this build reads versions 1 to 4)"), "{err}");
        assert!(matches!(Envelope::decode(ObjectMagic::Index, &f[..20]), Err(FormatError::Truncated { .. })));
        assert!(matches!(Envelope::decode(ObjectMagic::Index, &f[..3]), Err(FormatError::Truncated { .. })));
    }
}
