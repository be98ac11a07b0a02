//! A bootable test disk, built in the test from the host's Debian packages (installed by
//! scripts/test.sh): the kernel of `linux-image-amd64` and an initramfs the test makes
//! from `busybox-static` and the kernel's own modules.
//!
//! The disk (64 MiB, raw) has an MBR partition table with one ext4 partition holding
//! `/boot/vmlinuz`, `/boot/initrd.img` and, on a good disk, `/etc/blockproof-ok`. It has
//! no boot loader: `restore-test --boot --kernel /boot/vmlinuz --initrd /boot/initrd.img`
//! boots it directly. The initramfs's `/init` loads virtio and ext4, mounts `/dev/vda1`
//! read-only, prints [`OK`] when `/etc/blockproof-ok` is there and [`FAILED`] when not,
//! and powers off; with [`HANG`] on the kernel command line it hangs instead, with
//! [`STAY`] it writes to the disk and stays up. The MBR's
//! boot code writes [`FIRMWARE_OK`] to the first serial port and halts, so the firmware
//! boot (SeaBIOS) is tested with the same disk.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::Dir;

/// Printed by the initramfs when the root filesystem has `/etc/blockproof-ok`.
pub const OK: &str = "BLOCKPROOF-BOOT-OK";
/// Printed by the initramfs when it does not (or cannot be mounted).
pub const FAILED: &str = "BLOCKPROOF-BOOT-FAILED";
/// Printed by the MBR's boot code when the firmware boots the disk.
pub const FIRMWARE_OK: &str = "BLOCKPROOF-FIRMWARE-OK";
/// On the kernel command line: the initramfs hangs, printing [`HANGING`].
pub const HANG: &str = "blockproof.hang";
pub const HANGING: &str = "blockproof test init: hanging on purpose";
/// On the kernel command line: after [`OK`], the guest writes [`GUEST_BYTES`] at sector
/// [`GUEST_SECTOR`] of the disk (in the gap before the partition), prints [`GUEST_WROTE`]
/// once it is on the disk, and stays up instead of powering off.
pub const STAY: &str = "blockproof.stay";
/// On the kernel command line: after [`OK`], the guest starts its agent (`qemu-ga`, on
/// the virtio serial port the VM was given).
pub const AGENT: &str = "blockproof.agent";
const AGENT_BINARY: &str = "/usr/sbin/qemu-ga";
pub const GUEST_BYTES: &str = "written by the guest";
pub const GUEST_SECTOR: u64 = 100;
pub const GUEST_WROTE: &str = "BLOCKPROOF-GUEST-WROTE";
/// The kernel command line of a direct boot.
pub const APPEND: &str = "console=ttyS0 quiet panic=-1";

const DISK_BYTES: u64 = 64 << 20;
const PART_START: u64 = 1 << 20;

/// The host's newest Debian kernel and its modules directory.
fn host_kernel() -> (PathBuf, PathBuf) {
    let mut kernels: Vec<(PathBuf, PathBuf)> = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?;
            let modules = Path::new("/lib/modules").join(version);
            modules.join("modules.dep").is_file().then(|| (Path::new("/boot").join(&name), modules))
        })
        .collect();
    kernels.sort();
    kernels.pop().expect("no /boot/vmlinuz-* with /lib/modules: install linux-image-amd64 (scripts/test.sh does)")
}

/// `/bin/busybox`, statically linked (it runs alone in the initramfs).
fn static_busybox() -> Vec<u8> {
    let b = std::fs::read("/bin/busybox").expect("/bin/busybox: install busybox-static (scripts/test.sh does)");
    // ELF64: a PT_INTERP program header means a dynamic executable.
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let dynamic = (0..u16_at(0x38)).any(|i| {
        let at = phoff + i * u16_at(0x36);
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) == 3
    });
    assert!(!dynamic, "/bin/busybox is dynamically linked: install busybox-static (scripts/test.sh does)");
    b
}

/// The modules that provide `wanted` (when they are modules, not built in), with every
/// module they depend on, in an order insmod can load them.
fn module_closure(modules: &Path, wanted: &[&str]) -> Vec<PathBuf> {
    let dep = std::fs::read_to_string(modules.join("modules.dep")).unwrap();
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let name = |path: &str| {
        let file = path.rsplit('/').next().unwrap();
        file.split(".ko").next().unwrap().replace('-', "_")
    };
    for line in dep.lines() {
        let Some((path, rest)) = line.split_once(':') else { continue };
        assert!(path.ends_with(".ko"), "{path}: busybox insmod cannot load compressed modules");
        deps.insert(name(path), (path.to_string(), rest.split_whitespace().map(name).collect()));
    }
    fn visit(
        m: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut HashSet<String>,
        out: &mut Vec<String>,
    ) {
        let Some((path, needs)) = deps.get(m) else { return };
        if !seen.insert(m.to_string()) {
            return;
        }
        for n in needs {
            visit(n, deps, seen, out);
        }
        out.push(path.clone());
    }
    let (mut seen, mut out) = (HashSet::new(), Vec::new());
    for w in wanted {
        visit(w, &deps, &mut seen, &mut out);
    }
    out.into_iter().map(|p| modules.join(p)).collect()
}

/// The test's `/init`.
fn init_script(modules: &[String]) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do insmod /modules/$m || echo "insmod $m failed"; done
if grep -q {HANG} /proc/cmdline; then
  echo "{HANGING}"
  while true; do sleep 3600; done
fi
root=/dev/vda1
for a in $(cat /proc/cmdline); do case $a in blockproof.root=*) root=${{a#blockproof.root=}};; esac; done
i=0
while [ ! -b $root ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 -o ro $root /mnt && [ -f /mnt/etc/blockproof-ok ]; then
  echo {OK}
else
  echo {FAILED}
fi
if grep -q {AGENT} /proc/cmdline; then
  for p in /dev/vport*p1; do {AGENT_BINARY} -m virtio-serial -p "$p" & done
fi
if grep -q {STAY} /proc/cmdline; then
  printf '%s' '{GUEST_BYTES}' | dd of=/dev/vda bs=512 seek={GUEST_SECTOR} conv=notrunc,fsync 2>/dev/null && echo {GUEST_WROTE}
  while true; do sleep 3600; done
fi
poweroff -f
"#,
        modules = modules.join(" ")
    )
}

/// A cpio "newc" archive (what the kernel unpacks as its initramfs).
#[derive(Default)]
struct Cpio(Vec<u8>, u32);

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.1 += 1;
        let fields = [self.1, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.0.extend_from_slice(b"070701");
        for f in fields {
            self.0.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(0);
        self.pad();
        self.0.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.0
    }
}

/// The initramfs for `modules` (the host kernel's modules directory).
fn initramfs(modules: &Path) -> Vec<u8> {
    let files = module_closure(modules, &["virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4"]);
    let mut c = Cpio::default();
    for d in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "mnt", "modules", "run", "var", "tmp"]
    {
        c.entry(d, 0o040755, (0, 0), &[]);
    }
    c.entry("var/run", 0o120777, (0, 0), b"../run");
    // The guest agent, with the shared libraries it links (as `ldd` lists them).
    let agent = Path::new(AGENT_BINARY);
    assert!(agent.is_file(), "{AGENT_BINARY}: install qemu-guest-agent (scripts/test.sh does)");
    let ldd = Command::new("ldd").arg(agent).output().expect("ldd");
    let mut dirs = HashSet::new();
    let libs: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(str::to_string)
        .collect();
    for lib in libs.iter().map(String::as_str).chain([AGENT_BINARY]) {
        let rel = lib.trim_start_matches('/');
        let mut parent = Path::new(rel).parent();
        let mut chain = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            chain.push(p.to_str().unwrap().to_string());
            parent = p.parent();
        }
        for d in chain.into_iter().rev() {
            if dirs.insert(d.clone()) && !["usr", "usr/sbin"].contains(&d.as_str()) {
                c.entry(&d, 0o040755, (0, 0), &[]);
            }
        }
        c.entry(rel, 0o100755, (0, 0), &std::fs::read(lib).unwrap());
    }
    c.entry("dev/console", 0o020600, (5, 1), &[]);
    c.entry("bin/busybox", 0o100755, (0, 0), &static_busybox());
    let mut names = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        c.entry(&format!("modules/{name}"), 0o100644, (0, 0), &std::fs::read(f).unwrap());
        names.push(name);
    }
    c.entry("init", 0o100755, (0, 0), init_script(&names).as_bytes());
    c.finish()
}

/// 16-bit boot code at 0x7c00: writes [`FIRMWARE_OK`] to COM1 (port 0x3f8), then halts.
fn boot_code() -> Vec<u8> {
    let mut code = vec![
        0xfa, // cli
        0x31, 0xc0, // xor ax, ax
        0x8e, 0xd8, // mov ds, ax
        0xbe, 0x17, 0x7c, // mov si, 0x7c17 (the message)
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xac, // next: lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz done
        0xee, // out dx, al
        0xeb, 0xf8, // jmp next
        0xf4, // done: hlt
        0xeb, 0xfd, // jmp done
        0x90, // nop
    ];
    assert_eq!(code.len(), 0x17);
    code.extend_from_slice(FIRMWARE_OK.as_bytes());
    code.extend_from_slice(b"\r\n\0");
    code
}

/// The bootable test disk `name` in `dir`; `ok`: with `/etc/blockproof-ok`.
pub fn boot_disk(dir: &Dir, name: &str, ok: bool) -> PathBuf {
    let (vmlinuz, modules) = host_kernel();
    let fs = ext4_root(dir, name, ok, (DISK_BYTES - PART_START) / 1024, Some((&vmlinuz, &modules)));
    let mut disk = vec![0u8; DISK_BYTES as usize];
    let code = boot_code();
    disk[..code.len()].copy_from_slice(&code);
    // One primary partition, type 0x83, from 1 MiB to the end.
    let entry = &mut disk[446..462];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&((PART_START / 512) as u32).to_le_bytes());
    entry[12..16].copy_from_slice(&(((DISK_BYTES - PART_START) / 512) as u32).to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
    let fs_bytes = std::fs::read(&fs).unwrap();
    disk[PART_START as usize..PART_START as usize + fs_bytes.len()].copy_from_slice(&fs_bytes);
    let path = dir.join(name);
    std::fs::write(&path, disk).unwrap();
    std::fs::remove_file(fs).unwrap();
    path
}

/// An ext4 image of `kib` KiB holding `/etc/blockproof-ok` when `ok`, and the host's
/// kernel with the test's initramfs in `/boot` when given.
fn ext4_root(dir: &Dir, name: &str, ok: bool, kib: u64, kernel: Option<(&Path, &Path)>) -> PathBuf {
    let root = dir.join(&format!("{name}.root"));
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    if let Some((vmlinuz, modules)) = kernel {
        std::fs::copy(vmlinuz, root.join("boot/vmlinuz")).unwrap();
        std::fs::write(root.join("boot/initrd.img"), initramfs(modules)).unwrap();
    }
    if ok {
        std::fs::write(root.join("etc/blockproof-ok"), b"restore me\n").unwrap();
    }
    let fs = dir.join(&format!("{name}.ext4"));
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&root)
        .arg(&fs)
        .arg(format!("{kib}k"))
        .output()
        .expect("mke2fs");
    assert!(out.status.success(), "mke2fs: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(root).unwrap();
    fs
}

/// A disk that boots only by UEFI: GPT, an EFI system partition (FAT32, `vda1`) holding
/// the host's kernel as `vmlinuz.efi` (its EFI stub), the test's initramfs and a
/// `startup.nsh` that OVMF's UEFI shell runs (no boot entry matches, so the firmware
/// falls back to the shell), and an ext4 root (`vda2`) with `/etc/blockproof-ok`. The
/// shell starts the kernel with `console=ttyS0 blockproof.root=/dev/vda2`, so the same
/// initramfs prints [`OK`].
pub fn uefi_boot_disk(dir: &Dir, name: &str) -> PathBuf {
    const ESP_SECTORS: u64 = 40 << 11; // 40 MiB
    let (vmlinuz, modules) = host_kernel();
    let esp = dir.join(&format!("{name}.esp"));
    std::fs::write(&esp, vec![0u8; (ESP_SECTORS * 512) as usize]).unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/test.sh installs it)"));
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(Command::new("mkfs.vfat").args(["-F", "32"]).arg(&esp));
    let initrd = dir.join(&format!("{name}.initrd"));
    std::fs::write(&initrd, initramfs(&modules)).unwrap();
    let nsh = dir.join(&format!("{name}.nsh"));
    std::fs::write(&nsh, format!("fs0:\\vmlinuz.efi initrd=\\initrd.img {APPEND} blockproof.root=/dev/vda2\r\n"))
        .unwrap();
    for (from, to) in [(vmlinuz.as_path(), "::vmlinuz.efi"), (&initrd, "::initrd.img"), (&nsh, "::startup.nsh")] {
        run(Command::new("mcopy").arg("-i").arg(&esp).arg(from).arg(to));
    }
    let root_start = PART_START / 512 + ESP_SECTORS;
    let root_sectors = DISK_BYTES / 512 - root_start - 64; // the backup GPT at the end
    let root = ext4_root(dir, name, true, root_sectors / 2, None);
    let path = dir.join(name);
    let mut disk = vec![0u8; DISK_BYTES as usize];
    let esp_bytes = std::fs::read(&esp).unwrap();
    disk[PART_START as usize..PART_START as usize + esp_bytes.len()].copy_from_slice(&esp_bytes);
    let root_bytes = std::fs::read(&root).unwrap();
    let at = (root_start * 512) as usize;
    disk[at..at + root_bytes.len()].copy_from_slice(&root_bytes);
    std::fs::write(&path, disk).unwrap();
    let table = format!(
        "label: gpt\nstart={}, size={ESP_SECTORS}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
         start={root_start}, size={root_sectors}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        PART_START / 512
    );
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (scripts/test.sh installs fdisk)");
    use std::io::Write as _;
    sfdisk.stdin.take().unwrap().write_all(table.as_bytes()).unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk");
    for f in [esp, initrd, nsh, root] {
        std::fs::remove_file(f).unwrap();
    }
    path
}

/// Processes whose command line mentions `path` (a QEMU or script the test started
/// there), as `pid: command line`.
pub fn processes_using(path: &Path) -> Vec<String> {
    let needle = path.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(needle).then(|| format!("{pid}: {cmdline}"))
        })
        .collect()
}
