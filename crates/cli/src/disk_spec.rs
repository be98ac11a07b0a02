//! Parsing `--disk id=ID,source=SOURCE[,cbt=CBT]`.

use blockproof_core::{Budget, DiskInput};
use blockproof_source::Cbt;

use crate::Usage;

/// A parsed disk specification.
#[derive(Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub id: String,
    pub source: String,
    pub cbt: String,
    pub verify: Option<String>,
}

impl DiskSpec {
    pub fn parse(spec: &str) -> Result<Self, Usage> {
        let (mut id, mut source, mut cbt, mut verify) = (None, None, None, None);
        for part in spec.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                Usage(format!("invalid disk spec {spec:?}: expected id=ID,source=SOURCE[,cbt=CBT][,verify=BUDGET]"))
            })?;
            let slot = match key.trim() {
                "id" => &mut id,
                "source" => &mut source,
                "cbt" => &mut cbt,
                "verify" => &mut verify,
                other => return Err(Usage(format!("invalid disk spec {spec:?}: unknown key {other:?}"))),
            };
            if slot.replace(value.to_string()).is_some() {
                return Err(Usage(format!("invalid disk spec {spec:?}: {key} given twice")));
            }
        }
        let id = id.filter(|s| !s.is_empty()).ok_or_else(|| Usage(format!("disk spec {spec:?} needs id=ID")))?;
        let source =
            source.filter(|s| !s.is_empty()).ok_or_else(|| Usage(format!("disk spec {spec:?} needs source=PATH")))?;
        Ok(DiskSpec { id, source, cbt: cbt.unwrap_or_else(|| "none".into()), verify })
    }

    /// The disk with its source only: change tracking is ignored (for `verify`).
    pub fn input_without_cbt(mut self) -> Result<DiskInput, Usage> {
        self.cbt = "none".into();
        self.input()
    }

    /// Checks the source and change source and makes the disk input; the source is
    /// opened by the backup, once the parent restore point is known.
    pub fn input(self) -> Result<DiskInput, Usage> {
        let cbt: Cbt = self.cbt.parse().map_err(|e| Usage(format!("disk {}: {e}", self.id)))?;
        let spec =
            blockproof_source::DiskSpec::new(&self.source, cbt).map_err(|e| Usage(format!("disk {}: {e}", self.id)))?;
        let verify = match &self.verify {
            Some(b) => Some(Budget::parse(b).map_err(|e| Usage(format!("disk {}: {e}", self.id)))?),
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
        for bad in ["", "id=a", "source=/x", "id=a,source=/x,foo=1", "id=a,id=b,source=/x", "id=,source=/x", "junk"] {
            assert!(DiskSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
