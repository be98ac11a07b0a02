//! Disk specifications, `id=ID,source=SOURCE[,cbt=CBT][,verify=BUDGET]`: the syntax of
//! `blockproof backup --disk` and of a job file's `disks`.

use std::path::Path;

use blockproof_core::{Budget, DiskInput};
use blockproof_source::Cbt;

/// A parsed disk specification (checked, not opened: the source may appear later, made
/// by a pre hook).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub id: String,
    pub source: String,
    pub cbt: String,
    pub verify: Option<String>,
}

impl DiskSpec {
    /// Parses and checks a specification: its keys, the change source and whether it fits
    /// the source, the budget.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (mut id, mut source, mut cbt, mut verify) = (None, None, None, None);
        for part in spec.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("invalid disk spec {spec:?}: expected id=ID,source=SOURCE[,cbt=CBT][,verify=BUDGET]")
            })?;
            let slot = match key.trim() {
                "id" => &mut id,
                "source" => &mut source,
                "cbt" => &mut cbt,
                "verify" => &mut verify,
                other => return Err(format!("invalid disk spec {spec:?}: unknown key {other:?}")),
            };
            if slot.replace(value.to_string()).is_some() {
                return Err(format!("invalid disk spec {spec:?}: {key} given twice"));
            }
        }
        let id = id.filter(|s| !s.is_empty()).ok_or_else(|| format!("disk spec {spec:?} needs id=ID"))?;
        let source = source.filter(|s| !s.is_empty()).ok_or_else(|| format!("disk spec {spec:?} needs source=PATH"))?;
        let parsed = DiskSpec { id, source, cbt: cbt.unwrap_or_else(|| "none".into()), verify };
        parsed.check()?;
        Ok(parsed)
    }

    fn check(&self) -> Result<(), String> {
        let cbt: Cbt = self.cbt.parse().map_err(|e| format!("disk {}: {e}", self.id))?;
        blockproof_source::DiskSpec::new(&self.source, cbt).map_err(|e| format!("disk {}: {e}", self.id))?;
        if let Some(b) = &self.verify {
            Budget::parse(b).map_err(|e| format!("disk {}: {e}", self.id))?;
        }
        Ok(())
    }

    /// The spec with relative file paths (the source, a change list) taken relative to
    /// `base` (a job file's directory).
    pub fn relative_to(mut self, base: &Path) -> Self {
        let is_uri = self.source.starts_with("nbd:") || self.source.starts_with("nbd+");
        if !is_uri && Path::new(&self.source).is_relative() {
            self.source = base.join(&self.source).display().to_string();
        }
        if let Some(file) = self.cbt.strip_prefix("changes:") {
            if Path::new(file).is_relative() {
                self.cbt = format!("changes:{}", base.join(file).display());
            }
        }
        self
    }

    /// The disk with its source only: change tracking is ignored (for `verify`).
    pub fn input_without_cbt(mut self) -> Result<DiskInput, String> {
        self.cbt = "none".into();
        self.input()
    }

    /// The disk input for a backup; the source is opened by the backup, once the parent
    /// restore point is known.
    pub fn input(self) -> Result<DiskInput, String> {
        let cbt: Cbt = self.cbt.parse().map_err(|e| format!("disk {}: {e}", self.id))?;
        let spec = blockproof_source::DiskSpec::new(&self.source, cbt).map_err(|e| format!("disk {}: {e}", self.id))?;
        let verify = match &self.verify {
            Some(b) => Some(Budget::parse(b).map_err(|e| format!("disk {}: {e}", self.id))?),
            None => None,
        };
        let mut input = DiskInput::spec(self.id, spec);
        input.verify = verify;
        Ok(input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(
            DiskSpec::parse("id=sda,source=/x.img").unwrap(),
            DiskSpec { id: "sda".into(), source: "/x.img".into(), cbt: "none".into(), verify: None }
        );
        assert_eq!(DiskSpec::parse("source=/x,id=a,cbt=none").unwrap().id, "a");
        for bad in [
            "",
            "id=a",
            "source=/x",
            "id=a,source=/x,foo=1",
            "id=a,id=b,source=/x",
            "id=,source=/x",
            "junk",
            "id=a,source=/x.img,cbt=bitmap:auto",
            "id=a,source=/x.img,cbt=sometimes",
            "id=a,source=/x.img,verify=0%",
        ] {
            assert!(DiskSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_paths_follow_the_base() {
        let d = DiskSpec::parse("id=a,source=img/a.raw,cbt=changes:c.json").unwrap().relative_to(Path::new("/etc/bp"));
        assert_eq!((d.source.as_str(), d.cbt.as_str()), ("/etc/bp/img/a.raw", "changes:/etc/bp/c.json"));
        let n = DiskSpec::parse("id=a,source=nbd+unix:///x?socket=/s").unwrap().relative_to(Path::new("/etc"));
        assert_eq!(n.source, "nbd+unix:///x?socket=/s");
    }
}
