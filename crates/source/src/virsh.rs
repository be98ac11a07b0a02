//! libvirt through the `virsh` command (no C binding): every call runs `virsh -c URI`
//! with a time limit, its output captured (never passed to blockproof's own stdout, so
//! `--json` stays one document). The domain's XML is read with [`crate::xml`]: its disks
//! and their stable ids, its UUID, the user its QEMU runs as; and the definition for a
//! whole-VM restore is produced from it ([`restore_definition`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::xml::{self, Element};
use crate::SourceError;

/// The connection used when `--from libvirt:DOMAIN` names none.
pub const DEFAULT_URI: &str = "qemu:///system";

/// How long an ordinary virsh call may take.
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);

/// A libvirt connection, driven through `virsh -c URI`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Virsh {
    pub uri: String,
}

impl Virsh {
    pub fn new(uri: &str) -> Virsh {
        Virsh { uri: uri.to_string() }
    }

    /// Runs `virsh -c URI ARGS...` for at most `timeout` (then kills it): its stdout, or
    /// its error message (virsh's stderr) as the error.
    pub fn run_for(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut child = Command::new("virsh")
            .arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run virsh: {e}"))?;
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) | Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let stdout = out_t.join().unwrap_or_default();
        let stderr = err_t.join().unwrap_or_default();
        let what = format!("virsh {}", args.first().copied().unwrap_or_default());
        match status {
            None => Err(format!("{what} did not answer within {}s", timeout.as_secs())),
            Some(s) if s.success() => Ok(stdout),
            Some(_) => {
                let msg: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                let msg = msg.join("; ");
                let msg = msg.strip_prefix("error: ").unwrap_or(&msg).replace("; error: ", "; ");
                Err(format!("{what}: {msg}"))
            }
        }
    }

    /// [`Virsh::run_for`] with [`VIRSH_TIMEOUT`], its error a [`SourceError`].
    pub fn run(&self, args: &[&str]) -> Result<String, SourceError> {
        self.run_for(args, VIRSH_TIMEOUT).map_err(SourceError::Libvirt)
    }

    /// The names of the domain's checkpoints.
    pub fn checkpoints(&self, domain: &str) -> Result<Vec<String>, SourceError> {
        Ok(self
            .run(&["checkpoint-list", domain, "--name"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Whether a job (a backup, a migration, ...) runs on the domain.
    pub fn has_job(&self, domain: &str) -> Result<bool, SourceError> {
        let info = self.run(&["domjobinfo", domain])?;
        Ok(info.lines().find_map(|l| l.strip_prefix("Job type:")).is_some_and(|t| !matches!(t.trim(), "None" | "")))
    }
}

/// One disk of a libvirt domain (`<disk device='disk'>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainDisk {
    /// Its stable id: `<serial>`, else `<wwn>`, else the target dev (`vda`).
    pub id: String,
    /// The target dev: libvirt's name for the disk in backups and checkpoints.
    pub target: String,
    /// The image format (`<driver type=...>`: `qcow2`, `raw`, ...).
    pub format: String,
    /// The image file or device (`<source file|dev=...>`), if any.
    pub source: Option<String>,
}

/// What blockproof reads of a domain's live XML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub uuid: String,
    pub disks: Vec<DomainDisk>,
    /// The user and group QEMU runs as (`<seclabel model='dac'>`'s label), if libvirt
    /// says: `(uid, gid)`.
    pub qemu_user: Option<(u32, u32)>,
}

/// blockproof's rule for disk ids (as the backup checks them): 1-128 letters, digits and
/// `- _ . @ +`, not starting with a dot.
fn valid_disk_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b))
        && !id.starts_with('.')
}

/// Reads a domain's XML: its disks (device `disk` only: no cdrom, no floppy, no lun), by
/// stable id, in document order.
pub fn parse_domain(text: &str) -> Result<Domain, SourceError> {
    let bad = |what: String| SourceError::Libvirt(format!("unexpected domain XML: {what}"));
    let root = xml::parse(text).map_err(bad)?;
    if root.name != "domain" {
        return Err(bad(format!("the root element is <{}>", root.name)));
    }
    let name = root.child_text("name").ok_or_else(|| bad("no <name>".into()))?.to_string();
    let uuid = root.child_text("uuid").ok_or_else(|| bad("no <uuid>".into()))?.to_string();
    let mut disks = Vec::new();
    for d in root.child("devices").into_iter().flat_map(|d| d.children_named("disk")) {
        if d.attr("device").unwrap_or("disk") != "disk" {
            continue;
        }
        let target =
            d.child("target").and_then(|t| t.attr("dev")).ok_or_else(|| bad("a disk without a target dev".into()))?;
        let (id, from) =
            match (d.child_text("serial").filter(|s| !s.is_empty()), d.child_text("wwn").filter(|s| !s.is_empty())) {
                (Some(s), _) => (s, "serial"),
                (None, Some(w)) => (w, "wwn"),
                (None, None) => (target, "target dev"),
            };
        if !valid_disk_id(id) {
            return Err(SourceError::Invalid(format!(
                "disk {target} of domain {name}: its {from} {id:?} is not a valid blockproof disk id (1-128 letters, \
                 digits and - _ . @ +, not starting with a dot)"
            )));
        }
        let format = d.child("driver").and_then(|x| x.attr("type")).unwrap_or("raw").to_string();
        let source = d
            .child("source")
            .and_then(|s| s.attr("file").or_else(|| s.attr("dev")).or_else(|| s.attr("volume")))
            .map(String::from);
        disks.push(DomainDisk { id: id.to_string(), target: target.to_string(), format, source });
    }
    let mut ids: Vec<&str> = disks.iter().map(|d| d.id.as_str()).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(SourceError::Invalid(format!("domain {name}: two disks have the id {:?} (serial or wwn)", w[0])));
    }
    let qemu_user = root
        .children_named("seclabel")
        .find(|s| s.attr("model") == Some("dac"))
        .and_then(|s| s.child_text("label"))
        .and_then(dac_label);
    Ok(Domain { name, uuid, disks, qemu_user })
}

/// A DAC label `+64055:+64055` (numeric) or `libvirt-qemu:kvm` (names) as `(uid, gid)`.
fn dac_label(label: &str) -> Option<(u32, u32)> {
    let (u, g) = label.split_once(':')?;
    let uid = match u.strip_prefix('+') {
        Some(n) => n.parse().ok()?,
        None => u.parse().ok().or_else(|| lookup_user(u))?,
    };
    let gid = match g.strip_prefix('+') {
        Some(n) => n.parse().ok()?,
        None => g.parse().ok().or_else(|| lookup_group(g))?,
    };
    Some((uid, gid))
}

fn lookup_user(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or null; read at once.
    let p = unsafe { libc::getpwnam(c.as_ptr()) };
    (!p.is_null()).then(|| unsafe { (*p).pw_uid })
}

fn lookup_group(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam returns a pointer into static storage or null; read at once.
    let p = unsafe { libc::getgrnam(c.as_ptr()) };
    (!p.is_null()).then(|| unsafe { (*p).gr_gid })
}

/// The domain XML for a whole-VM restore: `definition` (a domain's XML, as a restore
/// point keeps it) named `name`, without its `<uuid>` (libvirt gives a new one), each
/// disk in `disks` (`(id, restored image, format)`, ids as [`parse_domain`] gives them)
/// pointing at its restored file with its format and no backing chain, and libvirt's
/// runtime details (`id`, `index`, aliases, dynamic security labels) left out. Disks of
/// the definition that the restore point does not hold (cdrom, ...) stay as they are.
pub fn restore_definition(
    definition: &str,
    name: &str,
    disks: &[(String, PathBuf, String)],
) -> Result<String, SourceError> {
    let dom = parse_domain(definition)?;
    let root = xml::parse(definition).map_err(|e| SourceError::Libvirt(format!("unexpected domain XML: {e}")))?;
    let mut edits = Vec::new();
    let tag_end =
        definition[root.range.clone()].find('>').map(|i| root.range.start + i + 1).unwrap_or(root.range.start);
    let mut head = format!("<domain type='{}'", xml::escape(root.attr("type").unwrap_or("kvm")));
    for (k, v) in root.attrs.iter().filter(|(k, _)| k != "type" && k != "id") {
        head.push_str(&format!(" {k}='{}'", xml::escape(v)));
    }
    head.push('>');
    edits.push((root.range.start..tag_end, head));
    let name_el = root.child("name").expect("parse_domain checked it");
    edits.push((name_el.range.clone(), format!("<name>{}</name>", xml::escape(name))));
    let uuid_el = root.child("uuid").expect("parse_domain checked it");
    edits.push((uuid_el.range.clone(), String::new()));
    for s in root.children_named("seclabel").filter(|s| s.attr("type") == Some("dynamic")) {
        edits.push((s.range.clone(), String::new()));
    }
    let mut wanted: Vec<&(String, PathBuf, String)> = disks.iter().collect();
    let disk_els: Vec<&Element> = root
        .child("devices")
        .into_iter()
        .flat_map(|d| d.children_named("disk"))
        .filter(|d| d.attr("device").unwrap_or("disk") == "disk")
        .collect();
    for (el, d) in disk_els.iter().zip(&dom.disks) {
        let Some(pos) = wanted.iter().position(|(id, _, _)| *id == d.id) else { continue };
        let (_, file, format) = wanted.remove(pos);
        let file = file.to_str().ok_or_else(|| SourceError::Invalid(format!("{} is not UTF-8", file.display())))?;
        let mut out = format!(
            "<disk type='file' device='disk'>\n      <driver name='qemu' type='{}'/>\n      <source file='{}'/>",
            xml::escape(format),
            xml::escape(file)
        );
        for c in &el.children {
            if matches!(c.name.as_str(), "driver" | "source" | "backingStore" | "alias" | "auth" | "mirror") {
                continue;
            }
            out.push_str("\n      ");
            out.push_str(&definition[c.range.clone()]);
        }
        out.push_str("\n    </disk>");
        edits.push((el.range.clone(), out));
    }
    if let Some((id, _, _)) = wanted.first() {
        return Err(SourceError::Invalid(format!("the domain definition has no disk {id}")));
    }
    Ok(xml::edit(definition, edits))
}

/// The file blockproof writes a restored domain definition to: `DIR/<vm>.xml`.
pub fn definition_file(dir: &Path, vm: &str) -> PathBuf {
    dir.join(format!("{vm}.xml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "<domain type='qemu' id='3'>
  <name>web01</name>
  <uuid>be8dc2b3-12c8-47f0-8b30-30a418201738</uuid>
  <memory unit='KiB'>131072</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/top.qcow2' index='2'/>
      <backingStore type='file' index='3'><format type='qcow2'/><source file='/images/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <serial>sys-disk</serial>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/images/w.raw'/>
      <target dev='vdc' bus='virtio'/>
      <wwn>5000c50015ea71ac</wwn>
    </disk>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+64055</label>
    <imagelabel>+64055:+64055</imagelabel>
  </seclabel>
</domain>";

    #[test]
    fn disks_are_found_by_stable_id() {
        let d = parse_domain(DOMAIN).unwrap();
        assert_eq!((d.name.as_str(), d.uuid.as_str()), ("web01", "be8dc2b3-12c8-47f0-8b30-30a418201738"));
        let ids: Vec<(&str, &str, &str)> =
            d.disks.iter().map(|d| (d.id.as_str(), d.target.as_str(), d.format.as_str())).collect();
        // The cdrom is no disk; serial, then wwn, then the target dev.
        assert_eq!(ids, [("sys-disk", "vda", "qcow2"), ("vdb", "vdb", "raw"), ("5000c50015ea71ac", "vdc", "raw")]);
        assert_eq!(d.disks[1].source.as_deref(), Some("/dev/vg/data"));
        assert_eq!(d.qemu_user, Some((64055, 64055)));
    }

    #[test]
    fn an_invalid_serial_or_duplicate_id_is_refused() {
        let bad = DOMAIN.replace("<serial>sys-disk</serial>", "<serial>sys disk</serial>");
        let e = parse_domain(&bad).unwrap_err().to_string();
        assert!(
            e.contains("disk vda of domain web01: its serial \"sys disk\" is not a valid blockproof disk id"),
            "{e}"
        );
        let dup = DOMAIN.replace("<wwn>5000c50015ea71ac</wwn>", "<serial>sys-disk</serial>");
        assert!(parse_domain(&dup).unwrap_err().to_string().contains("two disks have the id \"sys-disk\""));
    }

    #[test]
    fn dac_labels_numeric_and_named() {
        assert_eq!(dac_label("+64055:+64055"), Some((64055, 64055)));
        assert_eq!(dac_label("root:root"), Some((0, 0)));
        assert_eq!(dac_label("nosuchuser-bp:root"), None);
    }

    #[test]
    fn the_restore_definition_points_at_the_restored_files() {
        let disks = vec![
            ("sys-disk".to_string(), PathBuf::from("/r/sys-disk.qcow2"), "qcow2".to_string()),
            ("vdb".to_string(), PathBuf::from("/r/vdb.qcow2"), "qcow2".to_string()),
            ("5000c50015ea71ac".to_string(), PathBuf::from("/r/5000c50015ea71ac.qcow2"), "qcow2".to_string()),
        ];
        let x = restore_definition(DOMAIN, "web01-restored", &disks).unwrap();
        let d = parse_domain(&x.replace("<name>", "<uuid>u</uuid><name>")).unwrap();
        assert_eq!(d.name, "web01-restored");
        let got: Vec<(&str, Option<&str>, &str)> =
            d.disks.iter().map(|d| (d.id.as_str(), d.source.as_deref(), d.format.as_str())).collect();
        assert_eq!(
            got,
            [
                ("sys-disk", Some("/r/sys-disk.qcow2"), "qcow2"),
                ("vdb", Some("/r/vdb.qcow2"), "qcow2"),
                ("5000c50015ea71ac", Some("/r/5000c50015ea71ac.qcow2"), "qcow2")
            ]
        );
        for gone in ["<uuid>", "backingStore", "base.qcow2", "index=", " id='3'", "alias", "seclabel"] {
            assert!(!x.contains(gone), "{gone} left in {x}");
        }
        assert!(x.contains("/iso/install.iso"), "the cdrom stays");
        assert!(restore_definition(DOMAIN, "w", &[("nope".into(), "/r/n.raw".into(), "raw".into())]).is_err());
    }
}
