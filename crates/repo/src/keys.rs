//! Key slots: several passphrases can open one repository, each wrapping the same master
//! secret with Argon2id (docs/FORMAT.md §5). Adding a slot needs an open repository;
//! removing one never leaves the repository without a slot.

use blockproof_crypto::create_slot;
use blockproof_format::{KdfParams, KeySlot};
use blockproof_store::Kind;

use crate::{RepoError, Repository};

/// One key slot as listed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SlotInfo {
    /// The slot's file name (the BLAKE3 hash of its bytes).
    pub name: String,
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
    /// Whether this slot opened the current session.
    pub current: bool,
}

impl Repository {
    /// The name of the key slot that opened this session.
    pub fn current_slot(&self) -> &str {
        &self.slot
    }

    /// Every key slot (unreadable ones are listed with zero parameters).
    pub fn key_slots(&self) -> Result<Vec<SlotInfo>, RepoError> {
        let mut names = self.backend().list(Kind::Key)?;
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let params = self
                .backend()
                .read(Kind::Key, &name)
                .ok()
                .and_then(|b| KeySlot::decode(&b).ok())
                .map(|s| s.params)
                .unwrap_or(KdfParams { m_cost_kib: 0, t_cost: 0, p_cost: 0 });
            out.push(SlotInfo {
                current: name == self.slot,
                name,
                m_cost_kib: params.m_cost_kib,
                t_cost: params.t_cost,
                p_cost: params.p_cost,
            });
        }
        Ok(out)
    }

    /// Adds a key slot for `password`; returns its name.
    pub fn add_key(&self, password: &[u8], kdf: KdfParams) -> Result<String, RepoError> {
        let slot = create_slot(&self.secret, password, kdf).map_err(|e| RepoError::Kdf(e.to_string()))?;
        let bytes = slot.encode();
        let name = blake3::hash(&bytes).to_hex().to_string();
        self.backend().write(Kind::Key, &name, &bytes)?;
        Ok(name)
    }

    /// Removes the key slot named by `prefix` (unique prefix of its name). The last slot
    /// is never removed.
    pub fn remove_key(&self, prefix: &str) -> Result<String, RepoError> {
        let slots = self.key_slots()?;
        let matches: Vec<&SlotInfo> =
            slots.iter().filter(|s| s.name.starts_with(prefix) && !prefix.is_empty()).collect();
        let slot = match matches.as_slice() {
            [one] => *one,
            [] => return Err(RepoError::NotFound(format!("no key slot matches {prefix:?}"))),
            _ => return Err(RepoError::Invalid(format!("key slot prefix {prefix:?} is ambiguous"))),
        };
        if slots.len() == 1 {
            return Err(RepoError::Invalid(
                "this is the repository's only key slot; add another before removing it".into(),
            ));
        }
        self.backend().remove(Kind::Key, &slot.name)?;
        Ok(slot.name.clone())
    }
}

#[cfg(test)]
mod tests {
    use crate::{InitOptions, Repository};
    use blockproof_format::KdfParams;
    use blockproof_store::LocalBackend;

    #[test]
    fn add_open_remove_never_the_last() {
        let d = tempfile::tempdir().unwrap();
        let opts = InitOptions { kdf: KdfParams::MIN, ..InitOptions::default() };
        let repo = Repository::init(Box::new(LocalBackend::create(d.path()).unwrap()), b"one", &opts).unwrap();
        let first = repo.current_slot().to_string();
        let second = repo.add_key(b"two", KdfParams::MIN).unwrap();
        let reopened = Repository::open(Box::new(LocalBackend::open(d.path()).unwrap()), b"two").unwrap();
        assert_eq!(reopened.current_slot(), second);
        assert_eq!(reopened.id(), repo.id());
        assert_eq!(reopened.key_slots().unwrap().iter().filter(|s| s.current).count(), 1);
        reopened.remove_key(&first[..8]).unwrap();
        assert!(Repository::open(Box::new(LocalBackend::open(d.path()).unwrap()), b"one").is_err());
        assert!(reopened.remove_key(&second[..8]).is_err(), "the last slot stays");
        assert!(reopened.remove_key("zz").is_err());
    }
}
