//! The VM a restore point was taken from (`Snapshot::machine`), brought back beside its
//! restored disks by `restore SNAP --to DIR`: a definition that points at the restored
//! images, written next to them and never registered or started (docs/LIVE-VMS.md).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use blockproof_format::{Machine, MachineKind};
use serde_json::{json, Value};

/// One restored disk: its id, the image written, and that image's format.
pub struct RestoredDisk<'a> {
    pub id: &'a str,
    pub path: &'a Path,
    /// `raw` or `qcow2`.
    pub format: &'static str,
}

/// The definition file for a whole-VM restore: its path in `dir` and its contents.
pub fn definition(vm: &str, machine: &Machine, disks: &[RestoredDisk<'_>], dir: &Path) -> Result<(PathBuf, String)> {
    match machine.kind {
        MachineKind::Qmp => Ok((dir.join(format!("{vm}.qmp.json")), qmp_definition(vm, machine, disks)?)),
        MachineKind::Libvirt => Ok((dir.join(format!("{vm}.xml")), machine.definition.clone())),
    }
}

/// For QMP: the block graph the backup saw, each disk with its restored image and the
/// `-blockdev` argument that opens it under the same node name (so the VM's devices,
/// which name their drives by node, find them).
fn qmp_definition(vm: &str, machine: &Machine, disks: &[RestoredDisk<'_>]) -> Result<String> {
    let seen: Value =
        serde_json::from_str(&machine.definition).context("the restore point's block graph is not JSON")?;
    let seen_disks = seen["disks"].as_array().cloned().unwrap_or_default();
    let out: Vec<Value> = disks
        .iter()
        .map(|d| {
            let was = seen_disks.iter().find(|s| s["node"] == d.id).cloned().unwrap_or(Value::Null);
            let file = d.path.to_string_lossy();
            json!({
                "node": d.id,
                "restored": file,
                "format": d.format,
                "blockdev": format!(
                    "driver={},node-name={},file.driver=file,file.filename={}",
                    d.format,
                    d.id,
                    file.replace(',', ",,")
                ),
                "backed_up_from": was,
            })
        })
        .collect();
    let doc = json!({
        "vm": vm,
        "kind": "qmp",
        "consistency": machine.consistency.as_str(),
        "disks": out,
    });
    Ok(serde_json::to_string_pretty(&doc).expect("JSON values serialize") + "\n")
}

/// Writes `contents` to `path` whole or not at all: a temporary file beside it, synced,
/// then renamed over (refused when `path` exists and `force` is not given).
pub fn write_whole(path: &Path, contents: &str, force: bool) -> Result<()> {
    if !force && path.exists() {
        anyhow::bail!("{} exists (use --force to replace it)", path.display());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(contents.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .context("cannot write the definition")?;
    tmp.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockproof_format::Consistency;

    #[test]
    fn a_qmp_definition_names_every_restored_disk_under_its_node_name() {
        let m = Machine {
            kind: MachineKind::Qmp,
            consistency: Consistency::Crash,
            consistency_note: None,
            definition: r#"{"disks":[{"node":"sys","driver":"qcow2","file":"/vm/sys.qcow2","size":65536}]}"#.into(),
            uuid: None,
        };
        let p = Path::new("/r/a,b/sys.raw");
        let disks = [RestoredDisk { id: "sys", path: p, format: "raw" }];
        let (path, text) = definition("web", &m, &disks, Path::new("/r")).unwrap();
        assert_eq!(path, Path::new("/r/web.qmp.json"));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["disks"][0]["blockdev"],
            "driver=raw,node-name=sys,file.driver=file,file.filename=/r/a,,b/sys.raw"
        );
        assert_eq!(v["disks"][0]["backed_up_from"]["file"], "/vm/sys.qcow2");
        assert_eq!(v["consistency"], "crash");
        let bad = Machine { definition: "<x/>".into(), ..m };
        assert!(definition("web", &bad, &disks, Path::new("/r")).is_err());
    }
}
