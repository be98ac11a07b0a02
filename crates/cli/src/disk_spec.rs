//! `--disk id=ID,source=SOURCE[,cbt=CBT][,verify=BUDGET]`. The syntax is the one a job
//! file's disks use (`blockproof_fleet::disk`, one parser for both); from the command
//! line, every error in it is a usage error.

use blockproof_core::DiskInput;
use blockproof_fleet::disk::DiskSpec;

use crate::Usage;

/// The backup input a `--disk` spec names.
pub fn input(spec: &str) -> Result<DiskInput, Usage> {
    DiskSpec::parse(spec).and_then(DiskSpec::input).map_err(Usage)
}

/// The same for `verify`, which compares with the source as it is: a change source
/// given in the spec is ignored.
pub fn input_without_cbt(spec: &str) -> Result<DiskInput, Usage> {
    DiskSpec::parse(spec).and_then(DiskSpec::input_without_cbt).map_err(Usage)
}

/// `--disk` where a disk of a snapshot is named (restore, serve-nbd, diff, ls, ...): its
/// id, given bare (`--disk sda`) or as in a backup spec (`--disk id=sda`), so one spelling
/// works everywhere. A source or a change source has no meaning there and is refused.
pub fn disk_id(text: &str) -> Result<String, String> {
    let id = match text.strip_prefix("id=") {
        Some(rest) => {
            if let Some((id, extra)) = rest.split_once(',') {
                let key = extra.split('=').next().unwrap_or(extra);
                return Err(format!(
                    "{key}= has no meaning here: this names a disk of the snapshot by its id (--disk {id}); \
                     sources are given to backup and verify"
                ));
            }
            rest
        }
        None => text,
    };
    if id.is_empty() || id.contains(['=', ',']) {
        return Err(format!("invalid disk id {text:?}: give the id the disk was backed up under (--disk sda)"));
    }
    Ok(id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_id_is_bare_or_as_in_a_spec() {
        assert_eq!(disk_id("sda").unwrap(), "sda");
        assert_eq!(disk_id("id=web01-os").unwrap(), "web01-os");
        let e = disk_id("id=sda,source=/dev/sda").unwrap_err();
        assert!(e.starts_with("source= has no meaning here") && e.contains("--disk sda"), "{e}");
        for bad in ["", "id=", "cbt=none", "a,b"] {
            assert!(disk_id(bad).is_err(), "{bad}");
        }
    }
}
