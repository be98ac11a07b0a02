//! Running QEMU's programs: the accelerator, qcow2 overlays on NBD exports, and child
//! processes in a process group of their own (killed whole), with every signal
//! unblocked; shared by the boot test and instant recovery.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::{AccelChoice, Accelerator, Firmware, VmError};

pub(crate) fn accelerator(choice: AccelChoice) -> Result<Accelerator, VmError> {
    let kvm = || std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").map(drop);
    match choice {
        AccelChoice::Tcg => Ok(Accelerator::Tcg),
        AccelChoice::Kvm => kvm().map(|()| Accelerator::Kvm).map_err(VmError::NoKvm),
        AccelChoice::Auto => {
            Ok(if kvm().is_ok() && hardware_virtualization() { Accelerator::Kvm } else { Accelerator::Tcg })
        }
    }
}

/// Whether the CPU has VT-x or AMD-V. A `/dev/kvm` without them is a paravirtual KVM
/// (PVM, in some sandboxes) that runs only guest kernels built for it: an ordinary
/// guest hangs there, so `Auto` takes TCG.
fn hardware_virtualization() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Where Debian's `ovmf` package puts the UEFI firmware (code, read-only) and the
/// template of its variable store (copied for each VM: the VM writes its own).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// QEMU's arguments for the VM's firmware; for UEFI, the VM's variable store is made at
/// `vars` (from OVMF's template) unless it is there already (a VM started again keeps
/// its boot entries).
pub(crate) fn firmware_args(firmware: Firmware, vars: &Path) -> Result<Vec<String>, VmError> {
    match firmware {
        Firmware::Bios => Ok(Vec::new()),
        Firmware::Uefi => {
            for f in [OVMF_CODE, OVMF_VARS] {
                if !Path::new(f).is_file() {
                    return Err(VmError::NoUefi(f.into()));
                }
            }
            if !vars.exists() {
                std::fs::copy(OVMF_VARS, vars).map_err(VmError::io(format!("cannot write {}", vars.display())))?;
            }
            Ok(vec![
                "-drive".into(),
                format!("if=pflash,format=raw,readonly=on,file={}", option_value(Path::new(OVMF_CODE))),
                "-drive".into(),
                format!("if=pflash,format=raw,file={}", option_value(vars)),
            ])
        }
    }
}

/// A qcow2 overlay at `overlay` on export `disk` of the NBD server at `socket`: every
/// write lands in the overlay, reads of what it does not hold go to the export.
pub(crate) fn create_overlay(
    qemu_img: &Path,
    disk: &str,
    size: u64,
    socket: &Path,
    overlay: &Path,
) -> Result<(), VmError> {
    let backing = blockproof_nbd::Uri::unix(socket, disk).to_string();
    let out = command(qemu_img, Tie::OwnGroup)
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", &backing])
        .arg(overlay)
        .arg(size.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|source| spawn_error(qemu_img, source))?;
    if !out.status.success() {
        let message = String::from_utf8_lossy(&out.stderr).trim().replace('\n', "; ");
        return Err(VmError::Overlay { disk: disk.into(), message });
    }
    Ok(())
}

/// SIGKILL to the process group `child` leads (not yet reaped, so its id is still its
/// own), then reaps it.
pub(crate) fn kill_group(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory preconditions; the group is the child's own.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// How a child process is tied to this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tie {
    /// A process group of its own, killed when this process dies (a boot test's QEMU and
    /// script: nothing outlives the test).
    DiesWithParent,
    /// A process group of its own (a short-lived tool such as qemu-img).
    OwnGroup,
    /// A session of its own, detached from this process's terminal, outliving it (a
    /// recovered VM: it keeps running after `recover` ends).
    OwnSession,
}

/// A command in a process group (or session) of its own, with every signal unblocked (the
/// caller may have blocked SIGINT and SIGTERM), tied to this process as `tie` says.
pub(crate) fn command(program: &Path, tie: Tie) -> Command {
    let mut cmd = Command::new(program);
    if tie != Tie::OwnSession {
        cmd.process_group(0);
    }
    // SAFETY: only async-signal-safe calls (sigemptyset, pthread_sigmask, prctl, setsid)
    // between fork and exec, on local data.
    unsafe {
        cmd.pre_exec(move || {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            match tie {
                Tie::DiesWithParent => {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                }
                Tie::OwnSession => {
                    if libc::setsid() < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Tie::OwnGroup => {}
            }
            Ok(())
        });
    }
    cmd
}

pub(crate) fn spawn_error(program: &Path, source: io::Error) -> VmError {
    VmError::Spawn { program: program.display().to_string(), source }
}

/// `: LAST LINE` of a log file, or nothing when it is empty.
pub(crate) fn last_line(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    match text.lines().map(str::trim).rfind(|l| !l.is_empty()) {
        Some(line) => format!(": {}", line.chars().take(300).collect::<String>()),
        None => String::new(),
    }
}

/// A path as the value of a QEMU `key=value,...` option (a comma is doubled).
pub(crate) fn option_value(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_escaping() {
        assert_eq!(option_value(Path::new("/t/a,b")), "/t/a,,b");
    }
}
