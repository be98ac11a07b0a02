//! The repository server (`blockproof server`) against real clients on loopback with
//! TLS: the cycle per role; what a backup token can do against the history (delete,
//! overwrite, forget, gc, lock stealing, a back-dated snapshot) — refused or harmless,
//! and every snapshot still restores bit-exact; a maintain token's forget landing in the
//! trash and coming back; a token revoked in the middle of a backup; the server
//! SIGKILLed in the middle of an upload; three clients at once with gc.

mod harness;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockproof_server::{ClientOptions, RemoteBackend};
use blockproof_store::{Backend, Kind};
use harness::nbdkit::Nbdkit;
use harness::{hash, snap_id, Dir, TestCommand, PASSWORD};

/// A running server on an ephemeral port.
struct Server {
    child: Child,
    url: String,
    fingerprint: String,
    state: PathBuf,
}

impl Server {
    /// Serves `dir`'s repository directory as `main`.
    fn start(dir: &Dir, extra: &[&str]) -> Server {
        let state = dir.join("server-state");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_blockproof"));
        cmd.args(["server", "serve", "--listen", "127.0.0.1:0", "--state"])
            .arg(&state)
            .arg("--serve")
            .arg(format!("main={}", dir.repo().display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("start the server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = lines.next().unwrap().unwrap().strip_prefix("serving ").expect("serving line").to_string();
        let fingerprint =
            lines.next().unwrap().unwrap().strip_prefix("certificate ").expect("certificate line").to_string();
        Server { child, url, fingerprint, state }
    }

    /// Creates a token; returns its secret.
    fn token(&self, name: &str, role: &str) -> String {
        self.token_for(name, role, "*")
    }

    /// Creates a token limited to the vms matching `vms`; returns its secret.
    fn token_for(&self, name: &str, role: &str, vms: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_blockproof"))
            .args(["server", "token", "create", "--name", name, "--role", role, "--vms", vms, "--state"])
            .arg(&self.state)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A command on the served repository with `token`.
    fn cmd(&self, dir: &Dir, sub: &str, token: &str) -> TestCommand {
        let mut c = dir.cmd(sub);
        c.arg("--repo").arg(&self.url);
        c.env("BLOCKPROOF_TOKEN", token)
            .env("BLOCKPROOF_SERVER_FINGERPRINT", &self.fingerprint)
            .env("BLOCKPROOF_CACHE_DIR", dir.join("client-cache").to_str().unwrap());
        c
    }

    /// The storage trait on the served repository, as a client holding `token` has it.
    fn remote(&self, token: &str) -> RemoteBackend {
        let options = ClientOptions {
            token: token.into(),
            fingerprint: blockproof_server::tls::parse_fingerprint(&self.fingerprint),
            ca: None,
            vm: None,
        };
        RemoteBackend::open(&self.url, &options).unwrap()
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state.join("audit.log"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A backup through the server; it must leave no warning (every document a backup
/// writes is one the backup role may write).
fn backup(server: &Server, dir: &Dir, token: &str, vm: &str, img: &Path) -> String {
    let report = server
        .cmd(dir, "backup", token)
        .args(["--vm", vm, "--json", "--disk"])
        .arg(format!("id=d,source={}", img.display()))
        .json();
    assert_eq!(report["warnings"].as_array().map(Vec::len), Some(0), "{report}");
    snap_id(&report)
}

fn restores(server: &Server, dir: &Dir, token: &str, snap: &str, expected: &blake3::Hash) {
    let to = dir.join(&format!("restored-{snap}.raw"));
    let _ = std::fs::remove_file(&to);
    server.cmd(dir, "restore", token).arg(snap).args(["--disk", "d", "--to"]).arg(&to).ok();
    assert_eq!(&hash(&to), expected, "snapshot {snap}");
    std::fs::remove_file(&to).unwrap();
}

/// Init through the server with an admin token; backups with a backup token; restore
/// with a restore token; forget and gc with a maintain token (into the trash); the
/// forget undone by an admin from the trash; the audit log naming who did what.
#[test]
fn every_role_does_its_part_and_a_forget_comes_back_from_the_trash() {
    let dir = Dir::new();
    let server = Server::start(&dir, &[]);
    let (admin, backup_t, restore_t, maintain) = (
        server.token("root", "admin"),
        server.token("web01-host", "backup"),
        server.token("restorer", "restore"),
        server.token("ops", "maintain"),
    );
    let line = server.cmd(&dir, "init", &backup_t).args(["--kdf-memory", "8"]).fails_with_one_line(1);
    assert!(line.contains("permission denied: the backup role may not create"), "{line}");
    assert!(dir.repo_cmd("snapshots").output().status.code() != Some(0), "a backup token initialised the repository");
    server.cmd(&dir, "init", &admin).args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();

    let img = dir.image("d.img", 8 << 20, 1);
    let first = backup(&server, &dir, &backup_t, "web01", &img);
    let first_hash = hash(&img);
    let img2 = dir.image("d.img", 8 << 20, 2);
    let second = backup(&server, &dir, &backup_t, "web01", &img2);
    let second_hash = hash(&img2);
    restores(&server, &dir, &restore_t, &first, &first_hash);
    restores(&server, &dir, &restore_t, &second, &second_hash);
    let line = server
        .cmd(&dir, "backup", &restore_t)
        .args(["--vm", "x", "--disk"])
        .arg(format!("id=d,source={}", img.display()))
        .fails_with_one_line(1);
    assert!(line.contains("permission denied: the restore role may not create"), "{line}");

    // The maintain token forgets the second snapshot and collects its data: it all goes
    // to the trash.
    server.cmd(&dir, "forget", &maintain).arg(&second).ok();
    server.cmd(&dir, "gc", &maintain).ok();
    assert_eq!(server.cmd(&dir, "snapshots", &restore_t).arg("--json").json().as_array().unwrap().len(), 1);
    let mut list = dir.cmd("server");
    list.args(["trash", "list", "--json", "--repo", &server.url])
        .env("BLOCKPROOF_TOKEN", &maintain)
        .env("BLOCKPROOF_SERVER_FINGERPRINT", &server.fingerprint);
    assert!(list.fails_with_one_line(1).contains("the maintain role may not list the trash"));
    let mut list = dir.cmd("server");
    list.args(["trash", "list", "--json", "--repo", &server.url])
        .env("BLOCKPROOF_TOKEN", &admin)
        .env("BLOCKPROOF_SERVER_FINGERPRINT", &server.fingerprint);
    let trash = list.json();
    harness::assert_json_documented("server trash list", &trash);
    let mut tokens = dir.cmd("server");
    tokens.args(["token", "list", "--json", "--state"]).arg(&server.state);
    harness::assert_json_documented("server token list", &tokens.json());
    let kinds: Vec<&str> = trash.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"snapshot") && kinds.contains(&"pack"), "{trash}");

    let mut put_back = dir.cmd("server");
    put_back
        .args(["trash", "restore", "--all", "--repo", &server.url])
        .env("BLOCKPROOF_TOKEN", &admin)
        .env("BLOCKPROOF_SERVER_FINGERPRINT", &server.fingerprint)
        .env("BLOCKPROOF_CACHE_DIR", dir.join("client-cache").to_str().unwrap());
    put_back.ok();
    restores(&server, &dir, &restore_t, &second, &second_hash);
    let check = server.cmd(&dir, "check", &maintain).args(["--read-data", "100%", "--json"]).json();
    assert_eq!(check["errors"].as_array().map(|a| a.len()), Some(0), "{check}");
    assert!(check["warnings"].as_array().is_none_or(|w| w.is_empty()), "{check}");

    let audit = server.audit();
    let by = |token: &str, op: &str, kind: &str| {
        audit.iter().any(|e| e["token"] == token && e["op"] == op && e["kind"] == kind && e["outcome"] == "ok")
    };
    assert!(by("web01-host", "create", "pack") && by("web01-host", "create", "snapshot"));
    assert!(by("ops", "remove", "snapshot") && by("root", "trash-restore", "snapshot"));
    assert!(audit.iter().any(|e| e["token"] == "web01-host" && e["outcome"] == "refused" && e["op"] == "create"));
    assert!(audit.iter().all(|e| e["from"].as_str().unwrap().starts_with("127.0.0.1:")));
}

/// Waits until the audit log shows `token` doing `op` on `kind`.
fn wait_for(server: &Server, token: &str, op: &str, kind: &str) {
    let start = Instant::now();
    loop {
        let seen = std::fs::read_to_string(server.state.join("audit.log")).unwrap_or_default().lines().any(|l| {
            let e: serde_json::Value = serde_json::from_str(l).unwrap();
            e["token"] == token && e["op"] == op && e["kind"] == kind
        });
        if seen {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no {op} {kind} by {token}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Everything a backup token can send against the history: refused, or harmless; the
/// history restores bit-exact after each attempt.
#[test]
fn a_backup_token_cannot_destroy_the_history() {
    let dir = Dir::new();
    let server = Server::start(&dir, &[]);
    let (admin, attacker, other, maintain) = (
        server.token("root", "admin"),
        server.token("stolen", "backup"),
        server.token("db01-host", "backup"),
        server.token("ops", "maintain"),
    );
    server.cmd(&dir, "init", &admin).args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    let img1 = dir.image("a.img", 4 << 20, 1);
    let (a, a_hash) = (backup(&server, &dir, &attacker, "web01", &img1), hash(&img1));
    let img2 = dir.image("b.img", 4 << 20, 2);
    let (b, b_hash) = (backup(&server, &dir, &attacker, "web01", &img2), hash(&img2));
    let intact = || {
        restores(&server, &dir, &attacker, &a, &a_hash);
        restores(&server, &dir, &attacker, &b, &b_hash);
    };
    let remote = server.remote(&attacker);
    let denied = |r: Result<(), blockproof_store::StoreError>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains("permission denied") || e.contains("BLAKE3"), "{what}: {e}");
        assert_eq!(e.lines().count(), 1);
    };
    let packs = remote.list(Kind::Pack).unwrap();
    let snaps = remote.list(Kind::Snapshot).unwrap();
    let indexes = remote.list(Kind::Index).unwrap();
    denied(remote.remove(Kind::Pack, &packs[0]), "delete a pack");
    denied(remote.remove(Kind::Snapshot, &snaps[0]), "delete a snapshot");
    denied(remote.remove(Kind::Index, &indexes[0]), "delete an index file");
    denied(remote.remove(Kind::Key, &remote.list(Kind::Key).unwrap()[0]), "delete the key slot");
    denied(remote.remove(Kind::Config, "config"), "delete the config");
    denied(remote.write(Kind::Pack, &packs[0], b"other bytes"), "overwrite a pack");
    denied(remote.write(Kind::Snapshot, &snaps[0], b"other bytes"), "overwrite a snapshot");
    denied(remote.write(Kind::Config, "config", b"other bytes"), "overwrite the config");
    let forged = format!("forgotten-{}", "0".repeat(16));
    denied(remote.write(Kind::State, &forged, b"a forged forget record"), "forge a forget record");
    // The same bytes under the same name are harmless, and allowed.
    remote.write(Kind::Pack, &packs[0], &remote.read(Kind::Pack, &packs[0]).unwrap()).unwrap();
    // Lock stealing: another host's lock can be neither replaced nor removed.
    let theirs = server.remote(&other);
    theirs.write(Kind::Lock, "db01lock", b"their lock").unwrap();
    denied(remote.remove(Kind::Lock, "db01lock"), "remove another token's lock");
    denied(remote.write(Kind::Lock, "db01lock", b"mine now"), "replace another token's lock");
    assert_eq!(theirs.read(Kind::Lock, "db01lock").unwrap(), b"their lock");
    theirs.remove(Kind::Lock, "db01lock").unwrap();
    intact();

    // forget and gc with the backup token: one line each, nothing removed.
    let line = server.cmd(&dir, "forget", &attacker).arg(&a).fails_with_one_line(1);
    assert!(line.contains("permission denied"), "{line}");
    let junk = b"an unreferenced pack for gc to want to delete".to_vec();
    remote.write(Kind::Pack, &blake3::hash(&junk).to_hex(), &junk).unwrap();
    let line = server.cmd(&dir, "gc", &attacker).fails_with_one_line(1);
    assert!(line.contains("permission denied"), "{line}");
    theirs.write(Kind::Lock, "db01lock", b"their lock").unwrap();
    let (_, stderr) = server.cmd(&dir, "unlock", &attacker).arg("--all").code(1);
    assert!(stderr.lines().last().unwrap().contains("permission denied"), "{stderr}");
    assert_eq!(theirs.read(Kind::Lock, "db01lock").unwrap(), b"their lock");
    theirs.remove(Kind::Lock, "db01lock").unwrap();
    intact();

    // A snapshot dated into the future, written before the next real backup: by its own
    // time it would be the newest and `--keep-last 1` would keep it and remove the real
    // backup; the server's receipt time makes the real backup the newest.
    let repo = blockproof_repo::Repository::open(Box::new(server.remote(&attacker)), PASSWORD.as_bytes()).unwrap();
    let mut fake = repo.load_snapshot(&b).unwrap().snapshot;
    fake.time = "2099-01-01T00:00:00Z".into();
    let fake_id = repo.save_snapshot(&fake).unwrap().to_hex();
    let mut old = repo.load_snapshot(&b).unwrap().snapshot;
    old.time = "2001-01-01T00:00:00Z".into();
    let old_id = repo.save_snapshot(&old).unwrap().to_hex();
    drop(repo);
    std::thread::sleep(Duration::from_millis(1100));
    let img3 = dir.image("c.img", 4 << 20, 3);
    let (c, c_hash) = (backup(&server, &dir, &attacker, "web01", &img3), hash(&img3));
    let report = server.cmd(&dir, "forget", &maintain).args(["--keep-last", "1", "--json"]).json();
    let kept: Vec<&str> =
        report["forget"]["kept"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert_eq!(kept, [c.as_str()], "{report}");
    let removed: Vec<&str> =
        report["forget"]["removed"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert!(removed.contains(&fake_id.as_str()) && removed.contains(&old_id.as_str()), "{report}");
    // Every decision judged the server's receipt time (this last hour), never the time
    // the client wrote.
    let now = std::time::SystemTime::now();
    for d in report["forget"]["removed"].as_array().unwrap().iter().chain(report["forget"]["kept"].as_array().unwrap())
    {
        let t = humantime::parse_rfc3339(d["time"].as_str().unwrap()).unwrap();
        assert!(now.duration_since(t).unwrap_or_default() < Duration::from_secs(3600) && t <= now, "{d}");
    }
    restores(&server, &dir, &attacker, &c, &c_hash);
}

/// A token revoked while its backup runs: the backup fails at its next request with one
/// line, and the repository stays whole.
#[test]
fn a_token_revoked_in_the_middle_of_a_backup_fails_at_once() {
    let dir = Dir::new();
    let server = Server::start(&dir, &[]);
    let (admin, host) = (server.token("root", "admin"), server.token("web01-host", "backup"));
    server.cmd(&dir, "init", &admin).args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    let small = dir.image("small.img", 2 << 20, 4);
    let first = backup(&server, &dir, &host, "web01", &small);
    let img = dir.random_image("big.img", 24 << 20, 5);
    let slow = Nbdkit::start(&dir, "slow", &["--filter=rate", "file", img.to_str().unwrap(), "rate=8M"]);
    let mut running = server.cmd(&dir, "backup", &host);
    running.args(["--vm", "web02", "--disk"]).arg(format!("id=d,source={}", slow.uri()));
    let child = running.spawn_piped();
    wait_for(&server, "web01-host", "create", "lock");
    let revoked = Command::new(env!("CARGO_BIN_EXE_blockproof"))
        .args(["server", "token", "revoke", "web01-host", "--state"])
        .arg(&server.state)
        .output()
        .unwrap();
    assert!(revoked.status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("blockproof: error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("refused the token"), "{stderr}");
    let line = server.cmd(&dir, "snapshots", &host).fails_with_one_line(1);
    assert!(line.contains("unknown or revoked token"), "{line}");
    let reader = server.token("reader", "restore");
    restores(&server, &dir, &reader, &first, &hash(&small));
    let check = dir.repo_cmd("check").arg("--json").json();
    assert_eq!(check["ok"], true, "{check}");
}

/// The server SIGKILLed while a backup uploads: nothing is half-visible in the store,
/// the client fails with one line, and the same backup run again completes.
#[test]
fn a_server_killed_mid_upload_leaves_nothing_half_visible() {
    let dir = Dir::new();
    let mut server = Server::start(&dir, &[]);
    let (admin, host) = (server.token("root", "admin"), server.token("web01-host", "backup"));
    server.cmd(&dir, "init", &admin).args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "4MiB"]).ok();
    let img = dir.random_image("big.img", 40 << 20, 6);
    let slow = Nbdkit::start(&dir, "slow", &["--filter=rate", "file", img.to_str().unwrap(), "rate=16M"]);
    let mut running = server.cmd(&dir, "backup", &host);
    running.args(["--vm", "web01", "--disk"]).arg(format!("id=d,source={}", slow.uri()));
    let child = running.spawn_piped();
    wait_for(&server, "web01-host", "create", "pack");
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("blockproof: error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    // Straight on the directory: every file whole, no snapshot.
    let check = dir.repo_cmd("check").args(["--read-data", "100%", "--json"]).json();
    assert_eq!(check["ok"], true, "{check}");
    assert!(dir.snapshots().is_empty());

    let server = Server::start(&dir, &[]);
    let done = server
        .cmd(&dir, "backup", &host)
        .args(["--vm", "web01", "--json", "--disk"])
        .arg(format!("id=d,source={}", img.display()))
        .json();
    let reader = server.token("reader", "restore");
    restores(&server, &dir, &reader, &snap_id(&done), &hash(&img));
}

/// Three clients back up at once while a maintain token runs gc; every snapshot
/// restores and the repository checks whole.
#[test]
fn three_clients_and_gc_at_once_through_the_server() {
    let dir = Dir::new();
    let server = Server::start(&dir, &[]);
    let admin = server.token("root", "admin");
    server.cmd(&dir, "init", &admin).args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    let maintain = server.token("ops", "maintain");
    // Something for gc to collect: a forgotten snapshot's data.
    let old = dir.random_image("old.img", 4 << 20, 10);
    let host0 = server.token("host0", "backup");
    let gone = backup(&server, &dir, &host0, "old", &old);
    server.cmd(&dir, "forget", &maintain).arg(&gone).ok();
    let mut children = Vec::new();
    let mut images = Vec::new();
    for i in 1..=3 {
        let token = server.token(&format!("host{i}"), "backup");
        let img = dir.image(&format!("vm{i}.img"), 12 << 20, 20 + i as u64);
        let mut c = server.cmd(&dir, "backup", &token);
        c.args(["--vm", &format!("vm{i}"), "--json", "--disk"]).arg(format!("id=d,source={}", img.display()));
        children.push(c.spawn_piped());
        images.push(img);
    }
    server.cmd(&dir, "gc", &maintain).ok();
    let reader = server.token("reader", "restore");
    for (child, img) in children.into_iter().zip(&images) {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        restores(&server, &dir, &reader, &snap_id(&report), &hash(img));
    }
    server.cmd(&dir, "gc", &maintain).ok();
    let check = server.cmd(&dir, "check", &maintain).args(["--read-data", "100%", "--json"]).json();
    assert_eq!(check["ok"], true, "{check}");
}

/// A body over `--max-body` is refused before it is read, with one line; a path outside
/// the protocol is a 404; a request without a token is refused and logged.
#[test]
fn oversized_and_unauthenticated_requests_are_refused() {
    let dir = Dir::new();
    let mut server = Server::start(&dir, &["--max-body", "1", "--per-token", "1"]);
    let admin = server.token("root", "admin");
    server.cmd(&dir, "init", &admin).args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    let remote = server.remote(&admin);
    let big = vec![7u8; 2 << 20];
    let e = remote.write(Kind::Pack, &blake3::hash(&big).to_hex(), &big).unwrap_err().to_string();
    assert!(e.contains("a request body may be at most 1048576 bytes"), "{e}");
    assert_eq!(e.lines().count(), 1);
    assert!(remote.list(Kind::Pack).unwrap().is_empty());
    let small = vec![7u8; 1000];
    remote.write(Kind::Pack, &blake3::hash(&small).to_hex(), &small).unwrap();

    let options = ClientOptions { token: "bpt_root.0000".into(), ..ClientOptions::default() };
    let options =
        ClientOptions { fingerprint: blockproof_server::tls::parse_fingerprint(&server.fingerprint), ..options };
    let e = RemoteBackend::open(&server.url, &options).err().unwrap().to_string();
    assert!(e.contains("the server refused the token: unknown or revoked token"), "{e}");
    let wrong = ClientOptions { token: admin.clone(), fingerprint: Some([0; 32]), ..ClientOptions::default() };
    let e = RemoteBackend::open(&server.url, &wrong).err().unwrap().to_string();
    assert!(e.contains("not the pinned fingerprint"), "{e}");
    assert!(server
        .audit()
        .iter()
        .any(|e| e["op"] == "authenticate" && e["outcome"] == "refused" && e["token"] == "root"));
    let mut other = dir.cmd("snapshots");
    other
        .arg("--repo")
        .arg(format!("{}x", server.url))
        .env("BLOCKPROOF_TOKEN", &admin)
        .env("BLOCKPROOF_SERVER_FINGERPRINT", &server.fingerprint);
    let line = other.fails_with_one_line(1);
    assert!(line.contains("no repository mainx on this server"), "{line}");

    // One request in progress per token: two backups with the same token at once are
    // answered 429 in turn, wait and retry, and both complete.
    let images: Vec<_> = (0..2).map(|i| dir.random_image(&format!("p{i}.img"), 512 << 10, 30 + i)).collect();
    let children: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let mut c = server.cmd(&dir, "backup", &admin);
            c.args(["--vm", &format!("p{i}"), "--json", "--disk"]).arg(format!("id=d,source={}", img.display()));
            c.spawn_piped()
        })
        .collect();
    for (child, img) in children.into_iter().zip(&images) {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        restores(&server, &dir, &admin, &snap_id(&report), &hash(img));
    }

    // SIGTERM: the server stops cleanly.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert!(server.child.wait().unwrap().success());
}

/// Tokens limited to some vms: a backup token writes snapshots of its vms only; a
/// maintain token removes snapshots of its vms only, and cannot run gc.
#[test]
fn tokens_limited_to_some_vms() {
    let dir = Dir::new();
    let server = Server::start(&dir, &[]);
    let admin = server.token("root", "admin");
    server.cmd(&dir, "init", &admin).args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    let (web, db) = (server.token_for("web-hosts", "backup", "web*"), server.token_for("db-hosts", "backup", "db*"));
    let (web_ops, ops) = (server.token_for("web-ops", "maintain", "web*"), server.token("ops", "maintain"));
    let img = dir.image("d.img", 2 << 20, 1);
    let web01 = backup(&server, &dir, &web, "web01", &img);
    let line = server
        .cmd(&dir, "backup", &web)
        .args(["--vm", "db01", "--disk"])
        .arg(format!("id=d,source={}", img.display()))
        .fails_with_one_line(1);
    assert!(line.contains("token web-hosts may not write snapshots of vm db01"), "{line}");
    let db01 = backup(&server, &dir, &db, "db01", &img);

    let (_, stderr) = server.cmd(&dir, "forget", &web_ops).arg(&db01).code(1);
    assert!(stderr.contains("token web-ops may not remove snapshots of vm db01"), "{stderr}");
    restores(&server, &dir, &db, &db01, &hash(&img));
    server.cmd(&dir, "forget", &web_ops).arg(&web01).ok();
    let img2 = dir.random_image("e.img", 1 << 20, 2);
    let gone = backup(&server, &dir, &web, "web02", &img2);
    server.cmd(&dir, "forget", &web_ops).arg(&gone).ok();
    let line = server.cmd(&dir, "gc", &web_ops).fails_with_one_line(1);
    assert!(line.contains("needs a token for every vm"), "{line}");
    server.cmd(&dir, "gc", &ops).ok();
    restores(&server, &dir, &db, &db01, &hash(&img));
}
