//! Test harness for the `blockproof` binary, in the style of ripgrep's tests/util.rs:
//! a [`Dir`] owns a temporary directory; [`TestCommand`] builds and runs one invocation
//! and asserts on its exit code and output.
#![allow(dead_code)]

pub mod bootdisk;
pub mod garage;
pub mod libvirt;
pub mod nbdkit;
pub mod qemu;
pub mod qsd;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use rand::{Rng, RngCore, SeedableRng};

pub const PASSWORD: &str = "test password";
/// A marker string written into test images: it must never appear in a repository.
pub const MARKER: &[u8] = b"BLOCKPROOF-PLAINTEXT-MARKER-7f3a";

/// A temporary working directory with a repository path inside it, or with a repository
/// on an S3 store ([`Dir::on_s3`]).
pub struct Dir {
    tmp: tempfile::TempDir,
    s3: Option<(String, Vec<(&'static str, String)>)>,
}

impl Dir {
    pub fn new() -> Self {
        // BLOCKPROOF_TEST_KEEP=1 keeps the directory (to inspect the repository of a failure).
        let keep = std::env::var_os("BLOCKPROOF_TEST_KEEP").is_some();
        Dir {
            tmp: tempfile::Builder::new().prefix("blockproof-test-").disable_cleanup(keep).tempdir().unwrap(),
            s3: None,
        }
    }

    /// A directory whose repository is `url` (s3://BUCKET/PREFIX) on `garage`; commands get
    /// the node's credentials and endpoint, and a cache directory inside this directory.
    pub fn on_s3(garage: &garage::Garage, url: &str) -> Self {
        Dir { s3: Some((url.to_string(), garage.env())), ..Dir::new() }
    }

    /// The `--repo` argument: the S3 URL or the directory.
    pub fn repo_location(&self) -> std::ffi::OsString {
        match &self.s3 {
            Some((url, _)) => url.into(),
            None => self.repo().into(),
        }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn repo(&self) -> PathBuf {
        self.join("repo")
    }

    /// A command with `--repo` not yet added (subcommand first).
    pub fn cmd(&self, sub: &str) -> TestCommand {
        let mut c = Command::new(env!("CARGO_BIN_EXE_blockproof"));
        c.arg(sub).current_dir(self.path()).env("BLOCKPROOF_PASSWORD", PASSWORD).env_remove("BLOCKPROOF_REPO");
        // The caches (the blob index's; for S3, the read cache) inside this directory.
        c.env("BLOCKPROOF_CACHE_DIR", self.join("cache"));
        if let Some((_, env)) = &self.s3 {
            c.envs(env.iter().map(|(k, v)| (k, v))).env("BLOCKPROOF_CACHE_DIR", self.join("s3-cache"));
        }
        TestCommand { cmd: c }
    }

    /// A command run through another program (`via` is its argv prefix, for example
    /// `["unshare", "--pid", "--fork"]`), with `--repo` not yet added.
    pub fn cmd_via(&self, via: &[&str], sub: &str) -> TestCommand {
        let inner = self.cmd(sub);
        let mut c = Command::new(via[0]);
        c.args(&via[1..]).arg(inner.cmd.get_program()).args(inner.cmd.get_args());
        c.current_dir(self.path());
        for (k, v) in inner.cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        TestCommand { cmd: c }
    }

    /// A command on this directory's repository.
    pub fn repo_cmd(&self, sub: &str) -> TestCommand {
        let mut c = self.cmd(sub);
        c.arg("--repo").arg(self.repo_location());
        c
    }

    /// Initialises the repository with a fast KDF.
    pub fn init(&self) {
        self.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    }

    /// A backup of `disks` (id, source) with `--json`, not yet run.
    pub fn backup_cmd(&self, vm: &str, disks: &[(&str, &Path)]) -> TestCommand {
        let mut c = self.repo_cmd("backup");
        c.args(["--vm", vm, "--json"]);
        for (id, path) in disks {
            c.arg("--disk").arg(format!("id={id},source={}", path.display()));
        }
        c
    }

    /// Backs up disks; returns the parsed JSON report.
    pub fn backup(&self, vm: &str, disks: &[(&str, &Path)]) -> serde_json::Value {
        self.backup_cmd(vm, disks).json()
    }

    /// Writes a [`mixed_image`] of `size` bytes to `name` inside the directory.
    pub fn image(&self, name: &str, size: usize, seed: u64) -> PathBuf {
        let p = self.join(name);
        fs::write(&p, mixed_image(size, seed)).unwrap();
        p
    }

    /// Writes `size` random (incompressible) bytes to `name` inside the directory.
    pub fn random_image(&self, name: &str, size: usize, seed: u64) -> PathBuf {
        let mut data = vec![0u8; size];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        let p = self.join(name);
        fs::write(&p, data).unwrap();
        p
    }

    /// `check --read-data --json` passes.
    pub fn check_all(&self) {
        let r = self.repo_cmd("check").args(["--read-data", "--json"]).json();
        assert_eq!(r["ok"], true, "{r}");
    }

    /// Restores a disk to `name` inside the directory; returns the target path.
    pub fn restore(&self, snap: &str, disk: &str, name: &str) -> PathBuf {
        let to = self.join(name);
        self.repo_cmd("restore").arg(snap).args(["--disk", disk, "--to"]).arg(&to).ok();
        to
    }

    pub fn snapshots(&self) -> Vec<serde_json::Value> {
        self.repo_cmd("snapshots").arg("--json").json().as_array().unwrap().clone()
    }

    /// Every file below the repository.
    pub fn repo_files(&self) -> Vec<PathBuf> {
        files(&self.repo())
    }

    /// Sum of the sizes of the repository's files.
    pub fn repo_bytes(&self) -> u64 {
        self.repo_files().iter().map(|f| fs::metadata(f).unwrap().len()).sum()
    }

    /// Pack files, sorted.
    pub fn packs(&self) -> Vec<PathBuf> {
        files(&self.repo().join("data"))
    }
}

pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

/// The snapshot id of a backup report.
pub fn snap_id(report: &serde_json::Value) -> String {
    report["snapshot"].as_str().unwrap().to_string()
}

/// Writes a VMware-style change list (for `cbt=changes:FILE`) naming `areas`
/// (start, length) of a disk of `size` bytes.
pub fn change_list(path: &Path, size: usize, areas: &[(u64, u64)]) {
    let a: Vec<serde_json::Value> = areas.iter().map(|(s, l)| serde_json::json!({"start": s, "length": l})).collect();
    let json = serde_json::json!({"startOffset": 0, "length": size, "changedArea": a});
    fs::write(path, json.to_string()).unwrap();
}

/// One invocation of the binary.
pub struct TestCommand {
    cmd: Command,
}

impl TestCommand {
    pub fn arg(&mut self, a: impl AsRef<std::ffi::OsStr>) -> &mut Self {
        self.cmd.arg(a);
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn env(&mut self, k: &str, v: &str) -> &mut Self {
        self.cmd.env(k, v);
        self
    }

    /// Runs the command in a process group of its own (its id is the child's pid), so a
    /// signal to the group reaches every process it starts.
    pub fn own_process_group(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        self.cmd.process_group(0);
        self
    }

    /// Runs the binary with this umask (set in the child between fork and exec).
    pub fn umask(&mut self, mask: u32) -> &mut Self {
        use std::os::unix::process::CommandExt;
        // SAFETY: umask is async-signal-safe, touches no memory and cannot fail.
        unsafe {
            self.cmd.pre_exec(move || {
                libc::umask(mask as libc::mode_t);
                Ok(())
            });
        }
        self
    }

    /// Runs the binary with at most `bytes` of address space (`RLIMIT_AS`): a command
    /// that would read or allocate without bound fails instead of taking the machine.
    pub fn memory_limit(&mut self, bytes: u64) -> &mut Self {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe and only reads the struct passed to it.
        unsafe {
            self.cmd.pre_exec(move || {
                let limit = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: bytes as libc::rlim_t };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self
    }

    pub fn output(&mut self) -> Output {
        self.cmd.stdin(Stdio::null()).output().expect("run blockproof")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&mut self) -> String {
        let out = self.output();
        assert!(
            out.status.success(),
            "{:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            self.cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and asserts success; parses stdout as JSON.
    pub fn json(&mut self) -> serde_json::Value {
        let out = self.ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    /// Runs and asserts the exit code; returns (stdout, stderr).
    pub fn code(&mut self, code: i32) -> (String, String) {
        let out = self.output();
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
        assert_eq!(out.status.code(), Some(code), "{:?}\nstdout: {stdout}\nstderr: {stderr}", self.cmd);
        (stdout, stderr)
    }

    /// Runs and asserts a failure with exactly one line on stderr; returns that line.
    pub fn fails_with_one_line(&mut self, code: i32) -> String {
        let (_, stderr) = self.code(code);
        assert_eq!(stderr.lines().count(), 1, "expected one line on stderr, got: {stderr}");
        assert!(stderr.starts_with("blockproof: error: "), "{stderr}");
        stderr
    }

    /// Runs with standard output going into a pipe whose reader has already gone (as
    /// `blockproof ... | head -c0` once `head` has exited); returns (exit code, stderr).
    #[allow(dead_code)]
    pub fn run_into_closed_pipe(&mut self) -> (Option<i32>, String) {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = self.cmd.stdin(Stdio::null()).stdout(writer).stderr(Stdio::piped()).output().expect("run blockproof");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    }

    /// Runs with standard output going to `/dev/full` (every write fails with ENOSPC);
    /// returns (exit code, stderr).
    #[allow(dead_code)]
    pub fn run_into_full_device(&mut self) -> (Option<i32>, String) {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
        let out = self.cmd.stdin(Stdio::null()).stdout(full).stderr(Stdio::piped()).output().expect("run blockproof");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    }

    pub fn spawn(&mut self) -> Child {
        self.cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn blockproof")
    }

    /// Starts the command with stdout and stderr captured (read them with
    /// `wait_with_output`).
    pub fn spawn_piped(&mut self) -> Child {
        self.cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn blockproof")
    }
}

/// A deterministic disk image: per 1 MiB block zeros, random bytes, text-like data with
/// the marker, or a copy of an earlier block (duplicates). `size` is any byte count.
pub fn mixed_image(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut img = vec![0u8; size];
    let words: [&[u8]; 8] = [b"kernel ", b"backup ", b"volume ", b"snapshot ", b"block ", b"disk ", b"log ", MARKER];
    let mib = 1 << 20;
    let blocks = size.div_ceil(mib);
    for b in 0..blocks {
        let start = b * mib;
        let end = (start + mib).min(size);
        match rng.gen_range(0..20) {
            0..=6 => {}
            7..=11 => rng.fill_bytes(&mut img[start..end]),
            12..=18 => {
                let mut p = start;
                while p < end {
                    let w = words[rng.gen_range(0..words.len())];
                    let n = w.len().min(end - p);
                    img[p..p + n].copy_from_slice(&w[..n]);
                    p += n;
                }
            }
            _ if b > 0 => {
                let src = rng.gen_range(0..b) * mib;
                let len = end - start;
                img.copy_within(src..src + len, start);
            }
            _ => {}
        }
    }
    // The first sector looks like an MBR and always carries the marker.
    img[..MARKER.len()].copy_from_slice(MARKER);
    img
}

/// Overwrites `count` non-overlapping, `align`-aligned 64 KiB blocks with random data;
/// returns the bytes changed.
pub fn scatter_writes(img: &mut [u8], count: usize, align: usize, seed: u64) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let w = 64 << 10;
    let slots = (img.len() - w) / align;
    let mut used = std::collections::HashSet::new();
    let mut done = 0;
    while done < count {
        let off = rng.gen_range(0..slots) * align;
        if (off / 4096..(off + w) / 4096).any(|p| used.contains(&p)) {
            continue;
        }
        used.extend(off / 4096..(off + w) / 4096);
        rng.fill_bytes(&mut img[off..off + w]);
        done += 1;
    }
    (count * w) as u64
}

pub fn hash(path: &Path) -> blake3::Hash {
    blake3::hash(&fs::read(path).unwrap())
}

/// Asserts that docs/JSON.md names every field of `value` (at any depth) in the section
/// of `command` (the heading that names `` `COMMAND --json` ``) or in the conventions
/// before the first section: a field added to a command's JSON without a word in the
/// reference fails here.
#[allow(dead_code)]
pub fn assert_json_documented(command: &str, value: &serde_json::Value) {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/JSON.md"))
        .expect("docs/JSON.md");
    let mut sections = doc.split("\n## ");
    let conventions = sections.next().unwrap_or_default();
    let sections: Vec<&str> = sections.collect();
    let wanted = format!("`{command} --json`");
    let find = |name: &str| sections.iter().find(|s| s.lines().next().is_some_and(|heading| heading.contains(name)));
    let own = find(&wanted).unwrap_or_else(|| panic!("docs/JSON.md has no section for {wanted}"));
    // A section that embeds another command's report names it (`gc --json`).
    let mut section = own.to_string();
    for other in
        own.split('`').skip(1).step_by(2).filter(|t| t.ends_with(" --json") && **t != wanted[1..wanted.len() - 1])
    {
        section.push_str(find(&format!("`{other}`")).unwrap_or_else(|| panic!("no section for {other}")));
    }
    let mut keys = Vec::new();
    fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    out.push(k.clone());
                    collect(v, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(value, &mut keys);
    keys.sort();
    keys.dedup();
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !section.contains(&format!("`{k}`")) && !conventions.contains(&format!("`{k}`")))
        .collect();
    assert!(missing.is_empty(), "docs/JSON.md does not document {missing:?} of {wanted}");
}

/// Waits (up to a minute) until `path` exists: a test hook's signal that the binary
/// reached the point it pauses at.
#[allow(dead_code)]
pub fn wait_for(path: &Path) {
    wait_until(&format!("{} appearing", path.display()), || path.exists());
}

/// Waits (up to a minute) until `cond` holds; panics naming `what` when it never does.
#[allow(dead_code)]
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Whether a keeper of a kept view (`blockproof cleanup --vm VM --when-expired`) of state
/// directory `state` runs.
#[allow(dead_code)]
pub fn keeper_runs(vm: &str, state: &Path) -> bool {
    let state = state.canonicalize().unwrap_or_else(|_| state.to_path_buf());
    let pattern = format!("cleanup --vm {vm} --when-expired --state-dir {}", state.display());
    std::process::Command::new("pgrep").args(["-f", &pattern]).output().unwrap().status.success()
}
