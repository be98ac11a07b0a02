//! `serve-nbd` against real NBD clients: qemu-img convert, nbdcopy, nbdinfo (--map, --list),
//! qemu-io, over a unix socket and TCP; several clients at once; writes refused; unknown
//! exports refused; hostile clients dropped without harm to the others; the socket path
//! never clobbered; SIGTERM/SIGINT stop cleanly; and a qcow2 overlay on top of the export
//! (instant recovery) that takes writes without touching the backup.

mod harness;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use harness::qemu::{qemu, CHUNK};
use harness::{hash, mixed_image, Dir};

/// A running `serve-nbd` (stderr in a log file), killed when dropped.
struct Server {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Serves `snap` on `DIR/nbd.sock`; returns once the socket accepts connections.
    fn start(dir: &Dir, snap: &str, extra: &[&str]) -> Server {
        let sock = dir.join("nbd.sock");
        let mut server = Server::spawn(dir, snap, &[&["--socket", sock.to_str().unwrap()], extra].concat());
        server.wait_until(|| UnixStream::connect(&sock).is_ok());
        server.sock = sock;
        server
    }

    fn spawn(dir: &Dir, snap: &str, args: &[&str]) -> Server {
        let log = dir.join(&format!("serve-{}.log", rand::random::<u32>()));
        let child = Command::new(env!("CARGO_BIN_EXE_blockproof"))
            .args(["serve-nbd", "--repo"])
            .arg(dir.repo())
            .arg(snap)
            .args(args)
            .env("BLOCKPROOF_PASSWORD", harness::PASSWORD)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Server { child, sock: PathBuf::new(), log }
    }

    /// Polls `ready` (up to 10 s); panics with the server's log if it exits or never gets ready.
    fn wait_until(&self, mut ready: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if ready() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("serve-nbd did not get ready: {}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends a signal and waits for the exit.
    fn stop(&mut self, signal: &str) -> ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-s", signal, &pid]).status().unwrap().success());
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"))
}

#[test]
fn real_clients_read_the_backup_bit_exact() {
    let dir = Dir::new();
    dir.init();
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    std::fs::write(&a, mixed_image(24 << 20, 31)).unwrap();
    std::fs::write(&b, mixed_image(8 << 20, 32)).unwrap();
    let r = dir.backup("v", &[("sys", &a), ("data", &b)]);
    let server = Server::start(&dir, r["snapshot"].as_str().unwrap(), &[]);

    // Two clients at once, one per export, through qemu-img.
    let out_a = dir.join("a.out");
    let out_b = dir.join("b.out");
    let ta = {
        let (uri, out) = (server.uri("sys"), out_a.clone());
        std::thread::spawn(move || qemu("qemu-img", &["convert", "-O", "raw", &uri, s(&out)]))
    };
    qemu("qemu-img", &["convert", "-O", "raw", &server.uri("data"), s(&out_b)]);
    ta.join().unwrap();
    assert_eq!(hash(&out_a), hash(&a));
    assert_eq!(hash(&out_b), hash(&b));

    // The zero regions are holes in base:allocation (qemu-img map reads it).
    let map = qemu("qemu-img", &["map", "--output=json", "-f", "raw", &server.uri("sys")]);
    let entries: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert!(entries.as_array().unwrap().iter().any(|e| e["zero"] == true && e["data"] == false), "{map}");
    assert!(entries.as_array().unwrap().iter().any(|e| e["data"] == true), "{map}");

    // Writes are refused; unknown exports too.
    let w = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &server.uri("sys")]);
    assert!(!w.status.success(), "{}", String::from_utf8_lossy(&w.stdout));
    let u = run("qemu-img", &["info", &server.uri("nope")]);
    assert!(!u.status.success());
    assert_eq!(hash(&dir.restore(r["snapshot"].as_str().unwrap(), "sys", "after.img")), hash(&a));
}

/// nbdcopy copies the export (sparse), two copies of one export at once; nbdinfo --map shows
/// exactly the zero chunks as `hole,zero`; nbdinfo --list shows every export and the
/// `base:allocation` context; the export is read-only.
#[test]
fn nbdcopy_and_nbdinfo_see_data_and_holes() {
    let dir = Dir::new();
    dir.init();
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let data = mixed_image((12 << 20) + 4096, 51);
    std::fs::write(&a, &data).unwrap();
    std::fs::write(&b, mixed_image(2 << 20, 52)).unwrap();
    let r = dir.backup("v", &[("sys", &a), ("data", &b)]);
    let server = Server::start(&dir, r["snapshot"].as_str().unwrap(), &[]);

    let copies: Vec<PathBuf> = (0..2).map(|k| dir.join(&format!("copy{k}.raw"))).collect();
    std::thread::scope(|sc| {
        for out in &copies {
            let uri = server.uri("sys");
            sc.spawn(move || qemu("nbdcopy", &[&uri, s(out)]));
        }
    });
    for out in &copies {
        assert_eq!(hash(out), hash(&a));
    }

    // nbdinfo --map: "offset length type description", one line per extent.
    let map = qemu("nbdinfo", &["--map", &server.uri("sys")]);
    let mut expected: Vec<(u64, u64, bool)> = Vec::new();
    for (k, chunk) in data.chunks(CHUNK as usize).enumerate() {
        let zero = chunk.iter().all(|&b| b == 0);
        match expected.last_mut() {
            Some((_, len, z)) if *z == zero => *len += chunk.len() as u64,
            _ => expected.push((k as u64 * CHUNK, chunk.len() as u64, zero)),
        }
    }
    let got: Vec<(u64, u64, bool)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hole = match f[3] {
                "hole,zero" => true,
                "data" => false,
                other => panic!("unexpected extent type {other}: {map}"),
            };
            (f[0].parse().unwrap(), f[1].parse().unwrap(), hole)
        })
        .collect();
    assert_eq!(got, expected, "{map}");
    assert!(expected.iter().any(|e| e.2) && expected.iter().any(|e| !e.2));

    let list = qemu("nbdinfo", &["--list", &format!("nbd+unix://?socket={}", server.sock.display())]);
    for want in ["export=\"sys\"", "export=\"data\"", "base:allocation", "is_read_only: true"] {
        assert!(list.contains(want), "{want} missing: {list}");
    }
    // `nbdinfo --can write` exits 2 for "no".
    assert_eq!(run("nbdinfo", &["--can", "write", &server.uri("data")]).status.code(), Some(2));
}

/// `--listen 127.0.0.1:0` picks a free port and says which; qemu-img reads over TCP.
#[test]
fn tcp_listener_serves_qemu_img() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    std::fs::write(&img, mixed_image(4 << 20, 53)).unwrap();
    let r = dir.backup("v", &[("d", &img)]);
    let server = Server::spawn(&dir, r["snapshot"].as_str().unwrap(), &["--listen", "127.0.0.1:0"]);
    let mut base = String::new();
    server.wait_until(|| {
        let log = server.log_text();
        match log.split_whitespace().find(|w| w.starts_with("nbd://")) {
            Some(uri) => {
                base = uri.trim_end_matches("EXPORT").to_string();
                true
            }
            None => false,
        }
    });
    let out = dir.join("d.out");
    qemu("qemu-img", &["convert", "-O", "raw", &format!("{base}d"), s(&out)]);
    assert_eq!(hash(&out), hash(&img));
}

/// Hostile or broken clients end their own session only: garbage, a write with its data,
/// a truncated option. Meanwhile and afterwards real clients are served, and the server
/// lives on.
#[test]
fn bad_clients_are_dropped_and_others_served() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    std::fs::write(&img, mixed_image(4 << 20, 54)).unwrap();
    let r = dir.backup("v", &[("d", &img)]);
    let mut server = Server::start(&dir, r["snapshot"].as_str().unwrap(), &["--disk", "d"]);

    // Garbage instead of client flags and options.
    let mut c = UnixStream::connect(&server.sock).unwrap();
    c.write_all(&[0xff; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest); // the server hangs up

    // A write over a correct session: EPERM, and the session goes on (a read answers).
    let mut c = UnixStream::connect(&server.sock).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec(); // IHAVEOPT
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.push(b'd');
    c.write_all(&opt).unwrap();
    let mut size_flags = [0u8; 10];
    c.read_exact(&mut size_flags).unwrap();
    assert_eq!(u64::from_be_bytes(size_flags[..8].try_into().unwrap()), 4 << 20);
    let request = |kind: u16, cookie: u64, len: u32| {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&0u64.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    };
    c.write_all(&[request(1, 7, 4096), vec![0xaa; 4096], request(0, 8, 512)].concat()).unwrap();
    let mut reply = [0u8; 16];
    c.read_exact(&mut reply).unwrap();
    assert_eq!((u32::from_be_bytes(reply[4..8].try_into().unwrap()), reply[15]), (1, 7), "EPERM for cookie 7");
    let mut reply = vec![0u8; 16 + 512];
    c.read_exact(&mut reply).unwrap();
    assert_eq!((u32::from_be_bytes(reply[4..8].try_into().unwrap()), reply[15]), (0, 8));
    assert_eq!(&reply[16..], &std::fs::read(&img).unwrap()[..512]);

    // A truncated option, then the connection closed mid-way.
    let mut c = UnixStream::connect(&server.sock).unwrap();
    c.read_exact(&mut hello).unwrap();
    c.write_all(&[&3u32.to_be_bytes()[..], &opt[..10]].concat()).unwrap();
    drop(c);

    // qemu-io's write fails; reads still work; the backup is unchanged.
    let w = run("qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 4k", &server.uri("d")]);
    assert!(!w.status.success(), "{}", String::from_utf8_lossy(&w.stdout));
    let out = dir.join("d.out");
    qemu("qemu-img", &["convert", "-O", "raw", &server.uri("d"), s(&out)]);
    assert_eq!(hash(&out), hash(&img));
    assert!(server.alive(), "{}", server.log_text());
    assert!(server.log_text().contains("nbd client dropped"), "{}", server.log_text());
    assert!(!server.log_text().contains("panicked"), "{}", server.log_text());
}

/// The socket path: a regular file is never replaced, a live server's socket is not taken
/// over, a stale socket is. SIGTERM and SIGINT stop the server with exit 0 and remove the
/// socket.
#[test]
fn the_socket_is_never_clobbered_and_signals_stop_cleanly() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    std::fs::write(&img, mixed_image(1 << 20, 55)).unwrap();
    let r = dir.backup("v", &[("d", &img)]);
    let snap = r["snapshot"].as_str().unwrap();

    let precious = dir.join("precious.txt");
    std::fs::write(&precious, "keep me").unwrap();
    let line = dir.repo_cmd("serve-nbd").arg(snap).arg("--socket").arg(&precious).fails_with_one_line(2);
    assert!(line.contains("not a socket"), "{line}");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");

    let mut server = Server::start(&dir, snap, &[]);
    let line = dir.repo_cmd("serve-nbd").arg(snap).arg("--socket").arg(&server.sock).fails_with_one_line(2);
    assert!(line.contains("already listening"), "{line}");
    assert!(server.alive());
    qemu("qemu-img", &["info", &server.uri("d")]);
    let status = server.stop("TERM");
    assert_eq!(status.code(), Some(0), "{}", server.log_text());
    assert!(!server.sock.exists(), "the socket is removed");

    // A stale socket (nobody listens) is replaced; Ctrl-C stops that server too.
    drop(std::os::unix::net::UnixListener::bind(dir.join("nbd.sock")).unwrap());
    assert!(dir.join("nbd.sock").exists());
    let mut server = Server::start(&dir, snap, &[]);
    qemu("qemu-img", &["info", &server.uri("d")]);
    assert_eq!(server.stop("INT").code(), Some(0), "{}", server.log_text());
    assert!(!server.sock.exists());

    // Usage errors: both or neither listener, an unknown disk.
    dir.repo_cmd("serve-nbd").arg(snap).fails_with_one_line(2);
    dir.repo_cmd("serve-nbd").arg(snap).args(["--socket", "x.sock", "--listen", "127.0.0.1:0"]).fails_with_one_line(2);
    let line = dir
        .repo_cmd("serve-nbd")
        .arg(snap)
        .args(["--disk", "nope", "--socket"])
        .arg(dir.join("y.sock"))
        .fails_with_one_line(2);
    assert!(line.contains("no disk \"nope\""), "{line}");
    assert!(!dir.join("y.sock").exists());
}

/// Instant recovery: a qcow2 overlay backed by the export takes the VM's writes; the
/// backup stays as it was.
#[test]
fn a_qcow2_overlay_on_the_export_takes_writes() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    std::fs::write(&img, mixed_image(8 << 20, 33)).unwrap();
    let r = dir.backup("v", &[("d", &img)]);
    let snap = r["snapshot"].as_str().unwrap().to_string();
    let server = Server::start(&dir, &snap, &["--disk", "d"]);
    let overlay = dir.join("overlay.qcow2");
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &server.uri("d"), "-F", "raw", s(&overlay)]);
    let out = qemu("qemu-io", &["-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k", s(&overlay)]);
    assert!(out.contains("read 65536/65536"), "{out}");
    // Everything else reads through to the backup.
    let converted = dir.join("overlay.raw");
    qemu("qemu-img", &["convert", "-O", "raw", s(&overlay), s(&converted)]);
    let mut expected = std::fs::read(&img).unwrap();
    expected[1 << 20..(1 << 20) + 65536].fill(0x5a);
    assert_eq!(std::fs::read(&converted).unwrap(), expected);
    // qemu's own temporary overlay (`-snapshot` for qemu-system, `-s` for qemu-io).
    let out =
        qemu("qemu-io", &["-s", "-f", "raw", "-c", "write -P 0x77 0 4k", "-c", "read -P 0x77 0 4k", &server.uri("d")]);
    assert!(out.contains("read 4096/4096"), "{out}");
    drop(server);
    assert_eq!(hash(&dir.restore(&snap, "d", "after.img")), hash(&img), "the backup is untouched");
}

/// A damaged pack fails the reads that need it (EIO, the range on the server's stderr);
/// the server goes on serving what is intact.
#[test]
fn damaged_chunks_fail_the_read_not_the_server() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    let data = mixed_image(8 << 20, 56);
    std::fs::write(&img, &data).unwrap();
    let r = dir.backup("v", &[("d", &img)]);
    for pack in dir.packs() {
        let mut bytes = std::fs::read(&pack).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&pack, bytes).unwrap();
    }
    let mut server = Server::start(&dir, r["snapshot"].as_str().unwrap(), &[]);
    let out = dir.join("d.out");
    let convert = run("qemu-img", &["convert", "-O", "raw", &server.uri("d"), s(&out)]);
    assert!(!convert.status.success());
    assert!(server.log_text().contains("cannot be restored"), "{}", server.log_text());
    // Chunk by chunk: each read returns the source's bytes or fails; never other bytes.
    let (mut good, mut bad) = (0, 0);
    for chunk in 0..(8 << 20) / CHUNK {
        let cmd = format!("read -v {} 16", chunk * CHUNK);
        let o = run("qemu-io", &["-r", "-f", "raw", "-c", &cmd, &server.uri("d")]);
        let text = String::from_utf8_lossy(&o.stdout);
        if text.contains("read 16/16") {
            let hex: String = text.lines().next().unwrap()[10..58].split_whitespace().collect();
            let want: String = data[(chunk * CHUNK) as usize..][..16].iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, want, "chunk {chunk}");
            good += 1;
        } else {
            bad += 1;
        }
    }
    assert!(good > 0 && bad > 0, "{good} good, {bad} bad");
    assert!(server.alive());
}
