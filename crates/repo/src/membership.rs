//! A compact membership filter of blob ids: "certainly absent" or "maybe present".
//!
//! A split-block Bloom filter: 32-byte blocks of eight 32-bit words; a key picks one
//! block and sets one bit in each of its words, so a test reads one cache line. Blob ids
//! are keyed hashes, uniform already, so the block and the bits are taken from the id's
//! bytes with no further hashing. With [`BITS_PER_KEY`] bits per key about 2% of absent
//! ids test "maybe present" (measured by the test below); such an id costs a page read of
//! the table, never a wrong answer. The filter is part of the index cache (FORMAT §22).

use blockproof_format::Id;

/// Bits of filter per key: 1 byte per blob.
pub(crate) const BITS_PER_KEY: usize = 8;
/// Bytes per block.
pub(crate) const BLOCK_BYTES: usize = 32;

/// The odd constants that spread a key's 32 bits over the eight words of its block.
const SALT: [u32; 8] = [0x47b6137b, 0x44974d91, 0x8824ad5b, 0xa2b7289d, 0x705495c7, 0x2df1424b, 0x9efc4947, 0x5c6bfb31];

/// The filter: `blocks` blocks of eight words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Membership {
    words: Vec<u32>,
}

impl Membership {
    /// An empty filter sized for `keys` keys.
    pub(crate) fn for_keys(keys: usize) -> Self {
        let blocks = (keys * BITS_PER_KEY).div_ceil(BLOCK_BYTES * 8).max(1);
        Membership { words: vec![0; blocks * 8] }
    }

    pub(crate) fn blocks(&self) -> usize {
        self.words.len() / 8
    }

    /// The block of `id` and the bit in each of its words.
    fn place(&self, id: &Id) -> (usize, [u32; 8]) {
        let h = u64::from_le_bytes(id.0[8..16].try_into().expect("8 bytes"));
        let block = ((u128::from(h) * self.blocks() as u128) >> 64) as usize;
        let key = u32::from_le_bytes(id.0[16..20].try_into().expect("4 bytes"));
        (block, SALT.map(|s| 1u32 << (key.wrapping_mul(s) >> 27)))
    }

    pub(crate) fn insert(&mut self, id: &Id) {
        let (block, bits) = self.place(id);
        for (w, bit) in self.words[block * 8..block * 8 + 8].iter_mut().zip(bits) {
            *w |= bit;
        }
    }

    /// False only if `id` was never inserted.
    pub(crate) fn may_contain(&self, id: &Id) -> bool {
        let (block, bits) = self.place(id);
        self.words[block * 8..block * 8 + 8].iter().zip(bits).all(|(w, bit)| w & bit != 0)
    }

    /// The filter as stored: its words, little-endian.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// A filter from its stored bytes (a whole number of blocks, at least one).
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if !bytes.len().is_multiple_of(4) {
            return None;
        }
        Self::from_words(bytes.chunks_exact(4).map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes"))).collect())
    }

    /// A filter from its words as stored (a whole number of blocks, at least one).
    pub(crate) fn from_words(words: Vec<u32>) -> Option<Self> {
        (!words.is_empty() && words.len().is_multiple_of(BLOCK_BYTES / 4)).then_some(Membership { words })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seed: u64) -> Id {
        Id(*blake3::hash(&seed.to_le_bytes()).as_bytes())
    }

    /// Every inserted id tests present; about 2% of absent ones do too (bounded at 4%
    /// here: the bound is statistical, but 100 000 trials keep it far from flaky).
    #[test]
    fn inserted_ids_are_found_and_few_absent_ones() {
        let mut f = Membership::for_keys(100_000);
        assert_eq!(f.blocks(), 100_000 * 8 / 256);
        (0..100_000).for_each(|k| f.insert(&id(k)));
        assert!((0..100_000).all(|k| f.may_contain(&id(k))));
        let false_positives = (100_000..200_000).filter(|k| f.may_contain(&id(*k))).count();
        assert!(false_positives < 4_000, "{false_positives} of 100 000 absent ids tested present");
        assert!(false_positives > 0, "a filter of 1 byte per key cannot be exact");
        let back = Membership::from_bytes(&f.to_bytes()).unwrap();
        assert_eq!(back, f);
        assert!(Membership::from_bytes(&[0; 31]).is_none() && Membership::from_bytes(&[]).is_none());
    }

    /// The stored bytes are pinned: a filter written by one build is read by the next.
    #[test]
    fn the_layout_is_pinned() {
        let mut f = Membership::for_keys(1);
        f.insert(&Id([0x11; 32]));
        let bytes = f.to_bytes();
        assert_eq!(bytes.len(), 32);
        let set: Vec<u32> = bytes.chunks(4).map(|w| u32::from_le_bytes(w.try_into().unwrap())).collect();
        assert_eq!(set, [0x400, 0x1000, 0x1, 0x4, 0x80, 0x4000, 0x1000_0000, 0x80]);
    }
}
