//! What changed since the parent restore point, and VMware-style change lists.

use std::path::Path;

use serde::Deserialize;

use crate::SourceError;

/// What a change source says about a disk since the parent restore point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// Read everything; the reason is reported (`cbt=none`, a missing bitmap, ...).
    All { reason: String },
    /// Only these byte ranges (sorted, disjoint, merged `(offset, length)`) changed.
    Ranges(Vec<(u64, u64)>),
}

impl Changes {
    /// Sorts and merges overlapping or touching ranges, dropping empty ones.
    pub fn ranges(mut ranges: Vec<(u64, u64)>) -> Changes {
        ranges.retain(|r| r.1 > 0);
        ranges.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (off, len) in ranges {
            match out.last_mut() {
                Some((o, l)) if off <= *o + *l => *l = (*l).max(off + len - *o),
                _ => out.push((off, len)),
            }
        }
        Changes::Ranges(out)
    }
}

/// A VMware `QueryChangedDiskAreas` result (DiskChangeInfo), as JSON:
/// `{"startOffset": 0, "length": N, "changedArea": [{"start": S, "length": L}, ...]}`,
/// optionally with `"baseChangeId"` (the change id the query was made with: what the
/// list is relative to) and `"changeId"` (the disk's change id now, recorded with the
/// restore point for the next list to name as its base).
///
/// Parsed strictly: every field but the two change ids is required (an empty
/// `changedArea` is written `[]`) and an unknown key is an error. A misspelled
/// `changedArea` must never read as "nothing changed": that would store a stale restore
/// point as ok.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeList {
    pub start_offset: u64,
    pub length: u64,
    pub changed_area: Vec<ChangedArea>,
    #[serde(default)]
    pub base_change_id: Option<String>,
    #[serde(default)]
    pub change_id: Option<String>,
}

/// The longest change id accepted (VMware's are about 50 characters).
const MAX_CHANGE_ID: usize = 1024;

/// The base that means "every allocated area", not "since a restore point".
pub const ALL_AREAS: &str = "*";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangedArea {
    pub start: u64,
    pub length: u64,
}

impl ChangeList {
    /// Reads and validates a change list file.
    pub fn load(path: &Path) -> Result<ChangeList, SourceError> {
        let bytes =
            std::fs::read(path).map_err(|source| SourceError::ChangeList { path: path.to_path_buf(), source })?;
        Self::parse(&bytes).map_err(|e| SourceError::Invalid(format!("change list {}: {e}", path.display())))
    }

    /// Parses and validates: every changed area lies inside the covered range.
    pub fn parse(bytes: &[u8]) -> Result<ChangeList, String> {
        let list: ChangeList = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        for (key, id) in [("baseChangeId", &list.base_change_id), ("changeId", &list.change_id)] {
            if let Some(id) = id {
                if id.is_empty() || id.len() > MAX_CHANGE_ID || id.chars().any(char::is_control) {
                    return Err(format!("{key} must be 1 to {MAX_CHANGE_ID} characters without control characters"));
                }
            }
        }
        let end = list.start_offset.checked_add(list.length).ok_or("startOffset + length overflows")?;
        for a in &list.changed_area {
            let a_end = a.start.checked_add(a.length).ok_or("a changed area overflows")?;
            if a.start < list.start_offset || a_end > end {
                return Err(format!(
                    "changed area {}+{} lies outside the covered range {}+{}",
                    a.start, a.length, list.start_offset, list.length
                ));
            }
        }
        Ok(list)
    }

    /// The changes for a disk of `size` bytes. What the list does not cover (before
    /// `startOffset`, or after its end when the disk is larger) counts as changed: a
    /// list says nothing about a region it was not asked about.
    pub fn changes(&self, size: u64) -> Changes {
        let mut ranges: Vec<(u64, u64)> = self.changed_area.iter().map(|a| (a.start, a.length)).collect();
        let end = self.start_offset + self.length;
        ranges.push((0, self.start_offset.min(size)));
        if end < size {
            ranges.push((end, size - end));
        }
        ranges.retain(|&(o, _)| o < size);
        for r in &mut ranges {
            r.1 = r.1.min(size - r.0);
        }
        Changes::ranges(ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_sorts() {
        let c = Changes::ranges(vec![(100, 10), (0, 5), (5, 5), (105, 20), (200, 0), (300, 1)]);
        assert_eq!(c, Changes::Ranges(vec![(0, 10), (100, 25), (300, 1)]));
    }

    #[test]
    fn parses_the_vmware_shape_and_covers_what_it_does_not_know() {
        let j = br#"{"startOffset": 0, "length": 1048576,
                      "changedArea": [{"start": 65536, "length": 131072}, {"start": 0, "length": 512}]}"#;
        let list = ChangeList::parse(j).unwrap();
        assert_eq!(list.changes(1 << 20), Changes::Ranges(vec![(0, 512), (65536, 131072)]));
        // The disk grew past the list: the new tail counts as changed.
        assert_eq!(list.changes(2 << 20), Changes::Ranges(vec![(0, 512), (65536, 131072), (1 << 20, 1 << 20)]));
        let partial = ChangeList::parse(br#"{"startOffset": 4096, "length": 4096, "changedArea": []}"#).unwrap();
        assert_eq!(partial.changes(16384), Changes::Ranges(vec![(0, 4096), (8192, 8192)]));
    }

    #[test]
    fn refuses_areas_outside_the_range_and_bad_json() {
        assert!(ChangeList::parse(br#"{"startOffset": 0, "length": 10, "changedArea": [{"start": 8, "length": 4}]}"#)
            .unwrap_err()
            .contains("outside"));
        assert!(ChangeList::parse(br#"{"startOffset": 0}"#).is_err());
        assert!(ChangeList::parse(br#"{"startOffset": 0, "length": 1, "changedArea": [{"start": 0}]}"#).is_err());
        assert!(ChangeList::parse(br#"{"startOffset": 18446744073709551615, "length": 2, "changedArea": []}"#).is_err());
        assert!(ChangeList::parse(b"[]").is_err());
    }

    #[test]
    fn unknown_and_missing_keys_are_errors_naming_the_key() {
        let cases: [(&[u8], &str); 5] = [
            (br#"{"startOffset": 0, "length": 10, "changed_area": [{"start": 0, "length": 4}]}"#, "changed_area"),
            (br#"{"startOffset": 0, "length": 10}"#, "changedArea"),
            (br#"{"length": 10, "changedArea": []}"#, "startOffset"),
            (br#"{"startOffset": 0, "length": 10, "changedArea": [{"start": 0, "lenght": 4}]}"#, "lenght"),
            (br#"{"startOffset": 0, "length": 10, "changedArea": [], "extra": 1}"#, "extra"),
        ];
        for (json, key) in cases {
            let err = ChangeList::parse(json).unwrap_err();
            assert!(err.contains(key), "{key}: {err}");
        }
        // An empty list, spelled out, is a valid "nothing changed".
        let none = ChangeList::parse(br#"{"startOffset": 0, "length": 10, "changedArea": []}"#).unwrap();
        assert_eq!(none.changes(10), Changes::Ranges(vec![]));
    }

    #[test]
    fn change_ids_are_optional_and_checked() {
        let list = ChangeList::parse(
            br#"{"startOffset": 0, "length": 10, "changedArea": [], "baseChangeId": "52 de/4", "changeId": "52 de/5"}"#,
        )
        .unwrap();
        assert_eq!((list.base_change_id.as_deref(), list.change_id.as_deref()), (Some("52 de/4"), Some("52 de/5")));
        let plain = ChangeList::parse(br#"{"startOffset": 0, "length": 10, "changedArea": []}"#).unwrap();
        assert_eq!((plain.base_change_id, plain.change_id), (None, None));
        for (json, key) in [
            (&br#"{"startOffset": 0, "length": 10, "changedArea": [], "changeId": ""}"#[..], "changeId"),
            (br#"{"startOffset": 0, "length": 10, "changedArea": [], "baseChangeId": "a\nb"}"#, "baseChangeId"),
            (br#"{"startOffset": 0, "length": 10, "changedArea": [], "changeId": 5}"#, "invalid type"),
            (br#"{"startOffset": 0, "length": 10, "changedArea": [], "changeID": "x"}"#, "changeID"),
        ] {
            let err = ChangeList::parse(json).unwrap_err();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn a_missing_file_is_named_as_a_change_list() {
        let err = ChangeList::load(Path::new("/no/such/changes.json")).unwrap_err().to_string();
        assert!(err.contains("change list /no/such/changes.json") && !err.contains("source"), "{err}");
    }
}
