//! Roles, and what each may do to which repository file: one pure function,
//! [`decide`], so the whole policy is in one place and tested as a table.
//!
//! | role | read, list | create | overwrite | remove |
//! |---|---|---|---|---|
//! | backup | everything | packs, index files, snapshots, vm heads, events and confirmation summaries, locks | its own locks; vm heads and confirmation summaries (the old version kept in the trash) | its own locks |
//! | restore | everything | locks | its own locks | its own locks |
//! | maintain | everything | as backup | everything but config and keys (old version to the trash) | everything but config and keys (into the trash); any lock |
//! | admin | everything | everything | everything (old version to the trash) | everything (into the trash); any lock |
//!
//! Packs, index files, snapshots and key slots are content-addressed: the server checks
//! that the name is the BLAKE3 hash of the body before it writes one, so writing an
//! existing name writes the same bytes again, and no role can place other bytes under a
//! name. Locks are not history: a lock removed or replaced is not kept. Everything else a
//! request would destroy goes to the trash first, whoever sends it, and only time purges
//! the trash.

use blockproof_store::Kind;
use serde::{Deserialize, Serialize};

/// What a token may do in a repository. Ordered: each role may do less than the next
/// but one, except that `restore` cannot write what `backup` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Add new objects, read what an incremental needs, take and release its own locks.
    Backup,
    /// Read, and take and release its own locks.
    Restore,
    /// Forget, gc, check, repair: remove and replace (into the trash).
    Maintain,
    /// Everything, including the config and key slots, and the trash.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Backup, Role::Restore, Role::Maintain, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Backup => "backup",
            Role::Restore => "restore",
            Role::Maintain => "maintain",
            Role::Admin => "admin",
        }
    }

    fn maintains(self) -> bool {
        matches!(self, Role::Maintain | Role::Admin)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown role {s:?} (backup, restore, maintain, admin)"))
    }
}

/// What a request would do to one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Read,
    /// A write of a name that does not exist yet.
    Create,
    /// A write of a name that exists.
    Overwrite,
    Remove,
}

/// What the server does with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Do it.
    Allow,
    /// Do it, after the current version went to the trash.
    KeepOld,
    /// Refuse it: `403` with this text (it names the missing permission).
    Refuse(String),
}

/// Kinds whose names are the BLAKE3 hash of their bytes.
pub fn content_addressed(kind: Kind) -> bool {
    matches!(kind, Kind::Pack | Kind::Index | Kind::Snapshot | Kind::Key)
}

/// Name prefix of a vm's head in `state/` (the repository's own convention).
const HEAD_PREFIX: &str = "head-";
/// The state documents a backup creates: its vm's head, the events of its snapshot, and
/// its disks' confirmation page summaries (a cache).
const BACKUP_STATE: [&str; 3] = [HEAD_PREFIX, "event-", CONFIRM_PREFIX];
/// Name prefix of a disk's confirmation page summaries in `state/`, which each backup
/// of the disk replaces.
const CONFIRM_PREFIX: &str = "confirm-";

/// The policy. `own_lock`: the file is a lock this token created.
pub fn decide(role: Role, action: Action, kind: Kind, name: &str, own_lock: bool) -> Decision {
    use Action::*;
    let refuse = |what: &str| Decision::Refuse(format!("the {role} role may not {what} {kind} {name}"));
    let guarded = matches!(kind, Kind::Config | Kind::Key);
    match action {
        Read => Decision::Allow,
        Create => match kind {
            Kind::Lock => Decision::Allow,
            _ if guarded => {
                if role == Role::Admin {
                    Decision::Allow
                } else {
                    refuse("create")
                }
            }
            _ if role == Role::Restore => refuse("create"),
            // A backup writes its vm's head and its events; forget records, protection
            // markers and maintenance plans are maintenance's.
            Kind::State if role == Role::Backup && !BACKUP_STATE.iter().any(|p| name.starts_with(p)) => {
                refuse("create")
            }
            _ => Decision::Allow,
        },
        Overwrite => match kind {
            // Same name, same bytes (checked before): nothing is destroyed.
            _ if content_addressed(kind) && kind != Kind::Key => Decision::Allow,
            Kind::Lock if own_lock || role.maintains() => Decision::Allow,
            _ if guarded => {
                if role == Role::Admin {
                    Decision::KeepOld
                } else {
                    refuse("replace")
                }
            }
            Kind::State
                if role == Role::Backup && (name.starts_with(HEAD_PREFIX) || name.starts_with(CONFIRM_PREFIX)) =>
            {
                Decision::KeepOld
            }
            _ if role.maintains() && kind != Kind::Lock => Decision::KeepOld,
            _ => refuse("replace"),
        },
        Remove => match kind {
            Kind::Lock if own_lock || role.maintains() => Decision::Allow,
            _ if guarded && role != Role::Admin => refuse("remove"),
            _ if role.maintains() && kind != Kind::Lock => Decision::KeepOld,
            _ => refuse("remove"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::KINDS;
    use Action::*;

    #[test]
    fn backup_and_restore_can_never_destroy_anything_but_their_own_locks() {
        for role in [Role::Backup, Role::Restore] {
            for kind in KINDS {
                for name in ["head-00", "confirm-00", "forgotten-00", "abcd", "config"] {
                    for own in [false, true] {
                        let d = decide(role, Remove, kind, name, own);
                        if kind == Kind::Lock && own {
                            assert_eq!(d, Decision::Allow);
                        } else {
                            assert!(matches!(d, Decision::Refuse(_)), "{role} remove {kind} {name} {own}: {d:?}");
                        }
                        let d = decide(role, Overwrite, kind, name, own);
                        let harmless = (content_addressed(kind) && kind != Kind::Key) || (kind == Kind::Lock && own);
                        let kept = role == Role::Backup
                            && kind == Kind::State
                            && (name.starts_with("head-") || name.starts_with("confirm-"));
                        match d {
                            Decision::Allow => assert!(harmless, "{role} overwrite {kind} {name}"),
                            Decision::KeepOld => assert!(kept, "{role} overwrite {kind} {name}"),
                            Decision::Refuse(_) => assert!(!harmless && !kept),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_roles_table() {
        assert_eq!(decide(Role::Backup, Create, Kind::Pack, "ab", false), Decision::Allow);
        assert_eq!(decide(Role::Backup, Create, Kind::State, "event-ab", false), Decision::Allow);
        assert!(matches!(decide(Role::Backup, Create, Kind::State, "forgotten-ab", false), Decision::Refuse(_)));
        assert!(matches!(decide(Role::Backup, Create, Kind::State, "protect-ab", false), Decision::Refuse(_)));
        assert_eq!(decide(Role::Maintain, Create, Kind::State, "forgotten-ab", false), Decision::Allow);
        assert!(matches!(decide(Role::Backup, Create, Kind::Key, "ab", false), Decision::Refuse(_)));
        assert!(matches!(decide(Role::Restore, Create, Kind::Snapshot, "ab", false), Decision::Refuse(_)));
        assert_eq!(decide(Role::Restore, Create, Kind::Lock, "ab", false), Decision::Allow);
        assert_eq!(decide(Role::Maintain, Remove, Kind::Pack, "ab", false), Decision::KeepOld);
        assert_eq!(decide(Role::Maintain, Remove, Kind::Lock, "ab", false), Decision::Allow);
        assert!(matches!(decide(Role::Maintain, Remove, Kind::Key, "ab", false), Decision::Refuse(_)));
        assert!(matches!(decide(Role::Maintain, Overwrite, Kind::Config, "config", false), Decision::Refuse(_)));
        assert_eq!(decide(Role::Admin, Overwrite, Kind::Config, "config", false), Decision::KeepOld);
        assert_eq!(decide(Role::Admin, Remove, Kind::Key, "ab", false), Decision::KeepOld);
        let Decision::Refuse(why) = decide(Role::Backup, Remove, Kind::Snapshot, "ab", false) else { panic!() };
        assert_eq!(why, "the backup role may not remove snapshot ab");
    }
}
