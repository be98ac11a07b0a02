//! Key slots: the master secret wrapped by a passphrase-derived key.
//!
//! ```text
//! "BPKS" | version u16 | kdf u8 (1 = Argon2id) | m_cost_kib u32 | t_cost u32 | p_cost u32
//! | salt(32) | nonce(24) | ciphertext(64) | tag(16)
//! ```
//!
//! The wrapping key is Argon2id(passphrase, salt, params); the sealed payload is the
//! 64-byte master secret; the AD is every byte before the nonce, so the KDF parameters
//! cannot be downgraded without failing authentication. Key slots are the only files
//! besides the repository id that are not encrypted.

use crate::{FormatError, ObjectMagic, Reader, SEAL_OVERHEAD};

/// KDF identifier for Argon2id (version 0x13).
pub const KDF_ARGON2ID: u8 = 1;
/// Length of the master secret a slot wraps.
pub const MASTER_SECRET_LEN: usize = 64;
/// Length of the salt.
pub const SALT_LEN: usize = 32;
/// Bytes of a key slot before the sealed secret (the AD).
pub const KEYSLOT_AD_LEN: usize = 6 + 1 + 12 + SALT_LEN;
/// Total bytes of a key slot file.
pub const KEYSLOT_LEN: usize = KEYSLOT_AD_LEN + MASTER_SECRET_LEN + SEAL_OVERHEAD;

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl KdfParams {
    /// The default for new key slots: 64 MiB, 1 pass, 1 lane — above OWASP's first
    /// recommended Argon2id configuration (46 MiB, 1 pass, 1 lane), at about 50 ms per
    /// opening here: every command opens the repository, so this cost is in every run.
    pub const DEFAULT: KdfParams = KdfParams { m_cost_kib: 64 * 1024, t_cost: 1, p_cost: 1 };
    /// The smallest parameters accepted when opening a slot: weaker slots are refused.
    pub const MIN: KdfParams = KdfParams { m_cost_kib: 1024, t_cost: 1, p_cost: 1 };
    /// The largest accepted (4 GiB), so a hostile slot cannot exhaust memory.
    pub const MAX_M_COST_KIB: u32 = 4 * 1024 * 1024;
    /// The most passes accepted.
    pub const MAX_T_COST: u32 = 64;
    /// The most lanes accepted.
    pub const MAX_P_COST: u32 = 16;

    /// Whether a reader accepts these parameters; the same bounds apply when a slot is
    /// created, so no slot is ever written that cannot be opened.
    pub fn in_range(&self) -> bool {
        (KdfParams::MIN.m_cost_kib..=KdfParams::MAX_M_COST_KIB).contains(&self.m_cost_kib)
            && (1..=KdfParams::MAX_T_COST).contains(&self.t_cost)
            && (1..=KdfParams::MAX_P_COST).contains(&self.p_cost)
    }
}

/// A decoded key slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    pub params: KdfParams,
    pub salt: [u8; SALT_LEN],
    /// nonce | ciphertext | tag of the master secret.
    pub sealed: Vec<u8>,
}

impl KeySlot {
    /// The bytes before the sealed secret: the AD of the seal.
    pub fn ad(params: &KdfParams, salt: &[u8; SALT_LEN]) -> Vec<u8> {
        let mut out = Vec::with_capacity(KEYSLOT_AD_LEN);
        out.extend_from_slice(&ObjectMagic::KeySlot.header());
        out.push(KDF_ARGON2ID);
        out.extend_from_slice(&params.m_cost_kib.to_le_bytes());
        out.extend_from_slice(&params.t_cost.to_le_bytes());
        out.extend_from_slice(&params.p_cost.to_le_bytes());
        out.extend_from_slice(salt);
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Self::ad(&self.params, &self.salt);
        out.extend_from_slice(&self.sealed);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let rest = ObjectMagic::KeySlot.check(buf)?;
        let mut r = Reader::new(rest, "key slot");
        let kdf = r.u8()?;
        if kdf != KDF_ARGON2ID {
            return Err(r.malformed(format!("unknown key derivation function {kdf}")));
        }
        let params = KdfParams { m_cost_kib: r.u32()?, t_cost: r.u32()?, p_cost: r.u32()? };
        if !params.in_range() {
            return Err(r.malformed(format!("Argon2id parameters out of range: {params:?}")));
        }
        let salt = r.array()?;
        let sealed = r.take(MASTER_SECRET_LEN + SEAL_OVERHEAD)?.to_vec();
        r.finish()?;
        Ok(KeySlot { params, salt, sealed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_pinned() {
        assert_eq!(KEYSLOT_AD_LEN, 51);
        assert_eq!(KEYSLOT_LEN, 155);
        let slot = KeySlot { params: KdfParams::DEFAULT, salt: [9; 32], sealed: vec![1; 104] };
        let buf = slot.encode();
        assert_eq!(buf.len(), KEYSLOT_LEN);
        assert_eq!(&buf[..7], b"BPKS\x01\x00\x01");
        assert_eq!(KeySlot::decode(&buf).unwrap(), slot);
    }

    #[test]
    fn rejects_weak_or_hostile_params() {
        let weak =
            KeySlot { params: KdfParams { m_cost_kib: 8, t_cost: 1, p_cost: 1 }, salt: [0; 32], sealed: vec![0; 104] };
        assert!(KeySlot::decode(&weak.encode()).is_err());
        let huge = KeySlot {
            params: KdfParams { m_cost_kib: u32::MAX, t_cost: 1, p_cost: 1 },
            salt: [0; 32],
            sealed: vec![0; 104],
        };
        assert!(KeySlot::decode(&huge.encode()).is_err());
        let ok = KeySlot { params: KdfParams::MIN, salt: [0; 32], sealed: vec![0; 104] }.encode();
        for cut in 0..ok.len() {
            assert!(KeySlot::decode(&ok[..cut]).is_err());
        }
    }
}
