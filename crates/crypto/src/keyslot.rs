//! Key slots: wrapping the master secret under a passphrase with Argon2id.

use argon2::{Algorithm, Argon2, Params, Version};
use blockproof_format::keyslot::SALT_LEN;
use blockproof_format::{KdfParams, KeySlot};
use rand::RngCore;

use crate::{Aead, CryptoError, MasterSecret, SealKey, MASTER_SECRET_LEN};

fn derive(password: &[u8], salt: &[u8; SALT_LEN], p: &KdfParams) -> Result<SealKey, CryptoError> {
    let params =
        Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(32)).map_err(|e| CryptoError::Kdf(e.to_string()))?;
    let mut key = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(password, salt, &mut key)
        .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    Ok(SealKey::new(Aead::XChaCha20Poly1305, key))
}

/// Wraps `secret` in a new key slot for `password`.
pub fn create_slot(secret: &MasterSecret, password: &[u8], params: KdfParams) -> Result<KeySlot, CryptoError> {
    if !params.in_range() {
        return Err(CryptoError::Kdf(format!("Argon2id parameters out of the readable range: {params:?}")));
    }
    let mut salt = [0u8; SALT_LEN];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let cipher = derive(password, &salt, &params)?;
    let mut sealed = Vec::new();
    cipher.seal_into(&KeySlot::ad(&params, &salt), &secret.0, &mut sealed);
    Ok(KeySlot { params, salt, sealed })
}

/// Opens a key slot with `password`. A wrong password is [`CryptoError::WrongPassword`].
pub fn open_slot(slot: &KeySlot, password: &[u8]) -> Result<MasterSecret, CryptoError> {
    let cipher = derive(password, &slot.salt, &slot.params)?;
    let plain =
        cipher.open(&KeySlot::ad(&slot.params, &slot.salt), &slot.sealed).map_err(|_| CryptoError::WrongPassword)?;
    let mut s = [0u8; MASTER_SECRET_LEN];
    if plain.len() != MASTER_SECRET_LEN {
        return Err(CryptoError::WrongPassword);
    }
    s.copy_from_slice(&plain);
    Ok(MasterSecret(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_round_trip_and_wrong_password() {
        let secret = MasterSecret([3u8; 64]);
        let slot = create_slot(&secret, b"correct horse", KdfParams::MIN).unwrap();
        let decoded = KeySlot::decode(&slot.encode()).unwrap();
        assert_eq!(open_slot(&decoded, b"correct horse").unwrap().0, secret.0);
        assert_eq!(open_slot(&decoded, b"wrong").err(), Some(CryptoError::WrongPassword));
    }

    #[test]
    fn params_are_authenticated() {
        let secret = MasterSecret([3u8; 64]);
        let mut slot = create_slot(&secret, b"pw", KdfParams { m_cost_kib: 2048, t_cost: 1, p_cost: 1 }).unwrap();
        slot.params.m_cost_kib = 1024; // a downgrade attempt
        assert_eq!(open_slot(&slot, b"pw").err(), Some(CryptoError::WrongPassword));
    }
}
