//! Snapshot selectors: `VM:latest`, `VM:latest~N` (the Nth before the latest),
//! `VM:tag=TAG` (the newest with that tag) and `VM:before=TIME` (the newest taken at or
//! before TIME: RFC 3339, or a date `YYYY-MM-DD` meaning up to the end of that day, UTC).
//! Ids and unique id prefixes are resolved by the repository itself.

use std::time::{Duration, SystemTime};

use crate::{RepoError, SnapshotInfo};

/// Which of a vm's snapshots a selector names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// The latest but `n` (0: the latest).
    Latest(usize),
    /// The newest carrying the tag.
    Tag(String),
    /// The newest taken at or before the time.
    Before(SystemTime),
}

/// A `VM:SELECTOR` reference: `None` when the reference has no `:` (an id or prefix).
pub fn parse(reference: &str) -> Option<Result<(&str, Selector), RepoError>> {
    let (vm, sel) = reference.split_once(':')?;
    let bad = |why: &str| {
        RepoError::Invalid(format!(
            "invalid snapshot reference {reference:?}: {why} (use an id, an id prefix, VM:latest, VM:latest~N, \
             VM:tag=TAG or VM:before=TIME)"
        ))
    };
    let parsed = if sel == "latest" {
        Ok(Selector::Latest(0))
    } else if let Some(n) = sel.strip_prefix("latest~") {
        n.parse().map(Selector::Latest).map_err(|_| bad("~ takes a number of snapshots back"))
    } else if let Some(tag) = sel.strip_prefix("tag=") {
        if tag.is_empty() {
            Err(bad("the tag is empty"))
        } else {
            Ok(Selector::Tag(tag.to_string()))
        }
    } else if let Some(time) = sel.strip_prefix("before=") {
        before(time).map(Selector::Before).ok_or_else(|| bad("the time is not RFC 3339 or YYYY-MM-DD"))
    } else {
        Err(bad("unknown selector"))
    };
    Some(parsed.and_then(|s| if vm.is_empty() { Err(bad("the vm name is empty")) } else { Ok((vm, s)) }))
}

/// RFC 3339, or a date meaning up to (not including) the start of the next day, UTC.
fn before(text: &str) -> Option<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Some(t);
    }
    let day = humantime::parse_rfc3339(&format!("{text}T00:00:00Z")).ok()?;
    Some(day + Duration::from_secs(86400) - Duration::from_micros(1))
}

/// The snapshot of `vm` the selector names, from `snapshots` (oldest first).
pub fn select(snapshots: Vec<SnapshotInfo>, vm: &str, selector: &Selector) -> Option<SnapshotInfo> {
    let mut of_vm = snapshots.into_iter().rev().filter(|s| s.snapshot.vm == vm);
    match selector {
        Selector::Latest(n) => of_vm.nth(*n),
        Selector::Tag(tag) => of_vm.find(|s| s.snapshot.tags.contains(tag)),
        Selector::Before(t) => {
            of_vm.find(|s| humantime::parse_rfc3339_weak(&s.snapshot.time).is_ok_and(|time| time <= *t))
        }
    }
}

/// The selector in words, for messages (`the 2nd before the latest`).
pub fn describe(selector: &Selector) -> String {
    match selector {
        Selector::Latest(0) => "latest".into(),
        Selector::Latest(n) => format!("latest~{n}"),
        Selector::Tag(t) => format!("tag={t}"),
        Selector::Before(t) => format!("before={}", humantime::format_rfc3339_seconds(*t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockproof_format::{Id, Snapshot, SnapshotStatus};

    fn snap(vm: &str, time: &str, tags: &[&str]) -> SnapshotInfo {
        SnapshotInfo {
            id: Id(*blake3::hash(format!("{vm}{time}").as_bytes()).as_bytes()),
            snapshot: Snapshot {
                vm: vm.into(),
                time: time.into(),
                hostname: "h".into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                status: SnapshotStatus::Ok,
                disks: vec![],
                program: "t".into(),
                copied_from: None,
                machine: None,
            },
        }
    }

    #[test]
    fn selectors_pick_the_right_snapshot() {
        let all = vec![
            snap("a", "2026-11-30T10:00:00Z", &["monthly"]),
            snap("b", "2026-11-30T11:00:00Z", &[]),
            snap("a", "2026-12-01T10:00:00Z", &[]),
            snap("a", "2026-12-02T10:00:00Z", &[]),
        ];
        let pick = |r: &str| {
            let (vm, sel) = parse(r).unwrap().unwrap();
            select(all.clone(), vm, &sel).map(|s| s.snapshot.time)
        };
        assert_eq!(pick("a:latest").as_deref(), Some("2026-12-02T10:00:00Z"));
        assert_eq!(pick("a:latest~1").as_deref(), Some("2026-12-01T10:00:00Z"));
        assert_eq!(pick("a:latest~2").as_deref(), Some("2026-11-30T10:00:00Z"));
        assert_eq!(pick("a:latest~3"), None);
        assert_eq!(pick("a:tag=monthly").as_deref(), Some("2026-11-30T10:00:00Z"));
        assert_eq!(pick("b:tag=monthly"), None);
        assert_eq!(pick("a:before=2026-12-01").as_deref(), Some("2026-12-01T10:00:00Z"));
        assert_eq!(pick("a:before=2026-12-01T09:59:59Z").as_deref(), Some("2026-11-30T10:00:00Z"));
        assert_eq!(pick("a:before=2026-11-29"), None);
        assert!(parse("0123abcd").is_none());
        for bad in ["a:latest~x", "a:tag=", "a:before=soon", "a:newest", ":latest"] {
            assert!(matches!(parse(bad), Some(Err(RepoError::Invalid(_)))), "{bad}");
        }
    }
}
