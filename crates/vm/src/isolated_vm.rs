//! One boot test: overlays on the exports, an isolated QEMU, the check, and the stop
//! that leaves nothing behind (the crate doc has the whole sequence).

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blockproof_nbd::Exports;
use blockproof_source::{GuestAgent, Timeouts};
use blockproof_work::Cancel;

use crate::console::Console;
use crate::export_server::{ExportServer, StopServer};
use crate::qemu::{
    accelerator, command, create_overlay, firmware_args, kill_group, last_line, option_value, spawn_error, Tie,
};
use crate::VmError;

/// How often the console, QEMU and the script are looked at.
const POLL: Duration = Duration::from_millis(50);
/// How long one guest agent ping may take (and how often the agent is asked).
const AGENT_ANSWER: Duration = Duration::from_secs(1);
/// How long QEMU gets to quit when asked over QMP before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(5);

/// Which accelerator to run the VM with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM when `/dev/kvm` opens read-write and the CPU has hardware virtualization
    /// (`vmx` or `svm` in /proc/cpuinfo), TCG otherwise.
    Auto,
    /// KVM, or an error when `/dev/kvm` does not open read-write.
    Kvm,
    /// TCG (emulation), even where KVM is available.
    Tcg,
}

/// The accelerator a VM ran with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    pub fn name(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The VM's firmware.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS: boots the first disk's MBR boot loader.
    #[default]
    Bios,
    /// OVMF (Debian's `ovmf`): boots the EFI system partition's boot entries or
    /// `\EFI\BOOT\BOOTX64.EFI`, else its UEFI shell runs `startup.nsh`.
    Uefi,
}

/// How the VM boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// The firmware (SeaBIOS) boots the first disk with the disk's own boot loader.
    Firmware,
    /// QEMU loads this kernel (and initrd) itself, with this command line: the caller
    /// read them out of the restore point, so they are the backup's own.
    Kernel { kernel: Vec<u8>, initrd: Option<Vec<u8>>, append: String },
}

/// What to boot and what counts as success.
#[derive(Clone, Debug)]
pub struct BootSpec {
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: AccelChoice,
    pub firmware: Firmware,
    pub boot: Boot,
    /// Passes when this text appears on the serial console (then the agent is asked, then
    /// the script runs).
    pub marker: Option<String>,
    /// Passes when the guest agent (`qemu-ga` in the guest, on a virtio serial port named
    /// `org.qemu.guest_agent.0`) answers `guest-ping`, after the marker when there is one.
    pub agent: bool,
    /// Fails at once when this text appears on the serial console.
    pub fail_marker: Option<String>,
    /// Run after the marker (or as QEMU starts, without one), with `BLOCKPROOF_QMP` and
    /// `BLOCKPROOF_CONSOLE` and `script_env` set; exit status 0 passes.
    pub script: Option<PathBuf>,
    pub script_env: Vec<(String, String)>,
    /// From QEMU's start to the end of the check.
    pub timeout: Duration,
    /// Stops the test from another thread (everything is stopped, [`VmError::Cancelled`]).
    pub cancel: Cancel,
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
}

/// The outcome of a boot test that ran.
#[derive(Clone, Debug, PartialEq)]
pub struct BootOutcome {
    pub accelerator: Accelerator,
    /// Why it failed, in one line; `None`: it passed.
    pub reason: Option<String>,
    /// Seconds from QEMU's start to the marker, when it appeared.
    pub boot_seconds: Option<f64>,
    /// The end of the serial console (the last 4 KiB).
    pub console_excerpt: String,
}

impl BootOutcome {
    pub fn passed(&self) -> bool {
        self.reason.is_none()
    }
}

/// Boots `exports` (in the VM's disk order; the first one boots) in an isolated,
/// throwaway VM and checks it as `spec` says. Everything it started and created is gone
/// when it returns, whatever happened.
pub fn boot(exports: &Exports<'_>, spec: &BootSpec) -> Result<BootOutcome, VmError> {
    if spec.marker.is_none() && spec.script.is_none() && !spec.agent {
        return Err(VmError::NoCheck);
    }
    let accelerator = accelerator(spec.accel)?;
    let dir = tempfile::Builder::new()
        .prefix("blockproof-boot-")
        .tempdir()
        .map_err(VmError::io("cannot create the boot test's temporary directory"))?;
    let server = ExportServer::bind(&dir.path().join("nbd.sock")).map_err(VmError::io("cannot listen for the VM"))?;
    let outcome = std::thread::scope(|s| {
        let _stop = StopServer(&server);
        s.spawn(|| server.run(exports));
        run(dir.path(), &server, exports, spec, accelerator)
    });
    let path = dir.path().to_path_buf();
    dir.close().map_err(VmError::io(format!("cannot remove {}", path.display())))?;
    outcome
}

fn run(
    dir: &Path,
    server: &ExportServer,
    exports: &Exports<'_>,
    spec: &BootSpec,
    accelerator: Accelerator,
) -> Result<BootOutcome, VmError> {
    let mut args: Vec<String> = vec![
        "-name".into(),
        "blockproof-restore-test".into(),
        "-machine".into(),
        "q35".into(),
        "-accel".into(),
        accelerator.name().into(),
        "-cpu".into(),
        if accelerator == Accelerator::Kvm { "host" } else { "max" }.into(),
        "-m".into(),
        spec.memory_mib.to_string(),
        "-smp".into(),
        spec.cpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-nic".into(),
        "none".into(),
        "-no-reboot".into(),
    ];
    args.extend(firmware_args(spec.firmware, &dir.join("uefi-vars.fd"))?);
    for (i, (name, export)) in exports.iter().enumerate() {
        let overlay = dir.join(format!("disk{i}.qcow2"));
        create_overlay(&spec.qemu_img, name, export.size(), server.path(), &overlay)?;
        args.push("-drive".into());
        args.push(format!("if=none,id=disk{i},format=qcow2,cache=unsafe,file={}", option_value(&overlay)));
        args.push("-device".into());
        args.push(format!("virtio-blk-pci,drive=disk{i}{}", if i == 0 { ",bootindex=1" } else { "" }));
    }
    if let Boot::Kernel { kernel, initrd, append } = &spec.boot {
        let path = dir.join("kernel");
        std::fs::write(&path, kernel).map_err(VmError::io("cannot write the kernel"))?;
        args.extend(["-kernel".into(), path.display().to_string()]);
        if let Some(initrd) = initrd {
            let path = dir.join("initrd");
            std::fs::write(&path, initrd).map_err(VmError::io("cannot write the initrd"))?;
            args.extend(["-initrd".into(), path.display().to_string()]);
        }
        args.extend(["-append".into(), append.clone()]);
    }
    let console_path = dir.join("console.log");
    File::create(&console_path).map_err(VmError::io("cannot create the console file"))?;
    args.push("-chardev".into());
    args.push(format!("file,id=console,append=on,path={}", option_value(&console_path)));
    args.extend(["-serial".into(), "chardev:console".into()]);
    let qmp_path = dir.join("qmp.sock");
    args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", option_value(&qmp_path))]);
    // The guest agent's channel: a virtio serial port named as qemu-ga looks for it.
    let agent_path = dir.join("agent.sock");
    if spec.agent {
        args.extend(["-device".into(), "virtio-serial-pci,id=agent-serial".into()]);
        args.push("-chardev".into());
        args.push(format!("socket,id=agent,server=on,wait=off,path={}", option_value(&agent_path)));
        args.push("-device".into());
        args.push("virtserialport,bus=agent-serial.0,chardev=agent,name=org.qemu.guest_agent.0".into());
    }

    let mut console = Console::open(&console_path).map_err(VmError::io("cannot read the console file"))?;
    let qemu_log = dir.join("qemu.log");
    let log = File::create(&qemu_log).map_err(VmError::io("cannot create QEMU's log"))?;
    let mut cmd = command(&spec.qemu, Tie::DiesWithParent);
    cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    let child = cmd.spawn().map_err(|source| spawn_error(&spec.qemu, source))?;
    let started = Instant::now();
    let mut vm = Vm { child, qmp: qmp_path.clone() };

    let script_log = dir.join("script.log");
    let start_script = || -> Result<Script, VmError> {
        let path = spec.script.as_ref().expect("a script was given");
        let out = File::create(&script_log).map_err(VmError::io("cannot create the script's log"))?;
        let err = out.try_clone().map_err(VmError::io("cannot create the script's log"))?;
        let mut cmd = command(path, Tie::DiesWithParent);
        cmd.envs(spec.script_env.iter().map(|(k, v)| (k, v)))
            .env("BLOCKPROOF_QMP", &qmp_path)
            .env("BLOCKPROOF_CONSOLE", &console_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().map_err(|source| spawn_error(path, source))?;
        Ok(Script { child })
    };

    let markers: Vec<&str> = [spec.marker.as_deref().unwrap_or(""), spec.fail_marker.as_deref().unwrap_or("")].into();
    // The stages: the marker (when given), then the guest agent (when asked for): the VM
    // is up; then the script (when given). Without a marker or an agent the script
    // starts with QEMU.
    let mut marker_seen = spec.marker.is_none();
    let mut agent_answered = !spec.agent;
    let mut next_ping = Instant::now();
    let mut up = false;
    let mut script = None;
    let mut boot_seconds = None;
    let mut vm_status: Option<ExitStatus> = None;
    let reason: Option<String> = loop {
        if spec.cancel.is_cancelled() {
            return Err(VmError::Cancelled(spec.cancel.reason().unwrap_or_else(|| "cancelled".into())));
        }
        // Whether QEMU has gone is looked at before the console is read: what it wrote
        // before it went is then read now.
        if vm_status.is_none() {
            vm_status = vm.child.try_wait().map_err(VmError::io("waiting for QEMU"))?;
        }
        let seen = console.poll(&markers).map_err(VmError::io("reading the console"))?;
        if !up {
            match seen {
                Some(1) => {
                    let fail = spec.fail_marker.as_deref().unwrap_or_default();
                    break Some(format!("the console showed the failure marker {fail:?}"));
                }
                Some(_) => marker_seen = true,
                None => {}
            }
            if marker_seen && !agent_answered && vm_status.is_none() && Instant::now() >= next_ping {
                let timeouts = Timeouts { answer: AGENT_ANSWER, ..Timeouts::default() };
                agent_answered = GuestAgent::connect(&agent_path, timeouts).is_ok();
                next_ping = Instant::now() + AGENT_ANSWER;
            }
            if marker_seen && agent_answered {
                up = true;
                if spec.marker.is_some() || spec.agent {
                    boot_seconds = Some(started.elapsed().as_secs_f64());
                }
                match spec.script {
                    Some(_) => script = Some(start_script()?),
                    None => break None,
                }
            }
        }
        if let Some(s) = &mut script {
            if let Some(status) = s.child.try_wait().map_err(VmError::io("waiting for the check script"))? {
                let path = spec.script.as_deref().unwrap_or(Path::new("?")).display();
                break (!status.success())
                    .then(|| format!("the check script {path} failed ({status}){}", last_line(&script_log)));
            }
        } else if let Some(status) = vm_status {
            let why = if status.success() { String::new() } else { last_line(&qemu_log) };
            break Some(format!("the VM stopped ({status}) before {}{why}", awaited(spec, marker_seen).1));
        }
        if started.elapsed() >= spec.timeout {
            let within = human(spec.timeout);
            break Some(match (up, &spec.script) {
                (true, Some(path)) => format!("the check script {} did not finish within {within}", path.display()),
                _ => format!("no {} within {within}", awaited(spec, marker_seen).0),
            });
        }
        std::thread::sleep(POLL);
    };
    drop(script);
    vm.stop();
    // What QEMU wrote until it stopped, for the excerpt.
    let _ = console.poll(&[]);
    Ok(BootOutcome { accelerator, reason, boot_seconds, console_excerpt: console.excerpt() })
}

/// What the test still waited for, for a reason: the marker, or the agent's answer (as
/// "no ... within", and as "before ...").
fn awaited(spec: &BootSpec, marker_seen: bool) -> (String, String) {
    match &spec.marker {
        Some(marker) if !marker_seen => {
            (format!("{marker:?} on the console"), format!("{marker:?} appeared on the console"))
        }
        _ => ("answer from the guest agent".into(), "the guest agent answered".into()),
    }
}

/// A running QEMU, stopped (and reaped) when dropped.
struct Vm {
    child: Child,
    qmp: PathBuf,
}

impl Vm {
    /// Asks QEMU to quit over QMP; kills its process group if it is still there after
    /// [`QUIT_GRACE`].
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = blockproof_source::Qmp::connect_within(&self.qmp, Duration::from_secs(2)).and_then(|q| q.quit());
        let asked = Instant::now();
        while asked.elapsed() < QUIT_GRACE {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(POLL);
        }
        kill_group(&mut self.child);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running check script, killed with its whole process group when dropped.
struct Script {
    child: Child,
}

impl Drop for Script {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            kill_group(&mut self.child);
        }
    }
}

/// `5m`, `20s`, `1m30s`, `500ms`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, 0) => format!("{}ms", d.as_millis()),
        (0, 0, sec) => format!("{sec}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, sec) => format!("{m}m{sec}s"),
        (h, m, sec) => format!("{h}h{}", if m == 0 && sec == 0 { String::new() } else { format!("{m}m{sec}s") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_given() {
        assert_eq!(human(Duration::from_secs(300)), "5m");
        assert_eq!(human(Duration::from_secs(20)), "20s");
        assert_eq!(human(Duration::from_secs(90)), "1m30s");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
        assert_eq!(human(Duration::from_millis(500)), "500ms");
    }

    fn spec(qemu: PathBuf) -> BootSpec {
        BootSpec {
            memory_mib: 64,
            cpus: 1,
            accel: AccelChoice::Tcg,
            firmware: Firmware::Bios,
            boot: Boot::Firmware,
            marker: Some("x".into()),
            agent: false,
            fail_marker: None,
            script: None,
            script_env: Vec::new(),
            timeout: Duration::from_secs(1),
            cancel: Cancel::new(),
            qemu,
            qemu_img: "qemu-img".into(),
        }
    }

    #[test]
    fn a_missing_qemu_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let err = boot(&Vec::new(), &spec(tmp.path().join("no-such-qemu"))).unwrap_err();
        assert!(matches!(err, VmError::Spawn { .. }) && err.to_string().contains("no-such-qemu"), "{err}");
    }

    #[test]
    fn a_spec_without_a_check_is_refused_before_anything_starts() {
        let mut s = spec("qemu-system-x86_64".into());
        s.marker = None;
        assert!(matches!(boot(&Vec::new(), &s), Err(VmError::NoCheck)));
    }
}
