//! A real Garage node (an S3-compatible object store written in Rust) on loopback, one per
//! test: single node, `replication_factor = 1`, sqlite metadata, a bucket and a key made
//! with Garage's own CLI. The node dies with the test (SIGKILL on drop, and as the
//! parent-death signal should the test process itself die).
//!
//! Without a `garage` binary the S3 tests are skipped with a message, unless
//! `BLOCKPROOF_REQUIRE_S3=1` (set by `.ci/run`), which makes its absence a failure.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::RngCore;

pub struct Garage {
    dir: tempfile::TempDir,
    bin: PathBuf,
    child: Option<Child>,
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn find_garage() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join("garage")).find(|p| p.is_file())
}

impl Garage {
    /// Starts a node with one bucket per name in `buckets`; `None` (after saying so)
    /// when Garage is not installed and not required.
    pub fn start(buckets: &[&str]) -> Option<Garage> {
        let Some(bin) = find_garage() else {
            if std::env::var_os("BLOCKPROOF_REQUIRE_S3").is_some_and(|v| v == "1") {
                panic!("BLOCKPROOF_REQUIRE_S3=1 but no garage binary: cargo install garage --locked");
            }
            eprintln!("SKIPPED: garage is not installed (cargo install garage --locked); S3 tests not run");
            return None;
        };
        let dir = tempfile::Builder::new().prefix("blockproof-garage-").tempdir().unwrap();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let d = dir.path().display();
        let config = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
             replication_factor = 1\ncompression_level = \"none\"\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{}\"\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
            hex(32)
        );
        std::fs::write(dir.path().join("garage.toml"), config).unwrap();
        let mut g = Garage {
            dir,
            bin,
            child: None,
            endpoint: format!("http://127.0.0.1:{s3}"),
            key_id: format!("GK{}", hex(12)),
            secret: hex(32),
        };
        g.run_server();
        let node = g.admin(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        g.admin(&["layout", "assign", "-z", "dc1", "-c", "10G", &node]);
        g.admin(&["layout", "apply", "--version", "1"]);
        let (key_id, secret) = (g.key_id.clone(), g.secret.clone());
        g.admin(&["key", "import", "--yes", "-n", "blockproof", &key_id, &secret]);
        for b in buckets {
            g.admin(&["bucket", "create", b]);
            g.admin(&["bucket", "allow", "--read", "--write", "--owner", b, "--key", &key_id]);
        }
        Some(g)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    /// Where the node keeps object data.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run_server(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("garage.log")).unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(self.config())
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().expect("start garage"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.admin_ok(&["status"]) {
            assert!(Instant::now() < deadline, "garage did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn admin_ok(&self, args: &[&str]) -> bool {
        Command::new(&self.bin).arg("-c").arg(self.config()).args(args).output().is_ok_and(|o| o.status.success())
    }

    /// Runs a `garage` admin command; panics with its output when it fails.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = Command::new(&self.bin).arg("-c").arg(self.config()).args(args).output().unwrap();
        assert!(out.status.success(), "garage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    /// SIGKILLs the node (as a crash or a pulled cable would end it).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the node again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.run_server();
    }

    /// The environment a blockproof process needs to reach this node.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", "garage".into()),
            ("BLOCKPROOF_S3_ENDPOINT", self.endpoint.clone()),
        ]
    }

    /// Runs the test `name` of this test binary in a child process whose environment
    /// holds this node's credentials and endpoint ([`Garage::env`]) and
    /// `BLOCKPROOF_TEST_CHILD=1`; panics with its output unless it ran and passed. For
    /// tests that use the S3 client in-process: it reads its credentials from the
    /// environment, which a multi-threaded test process must not change. The child test is
    /// `#[ignore]`d so that it runs only this way, and returns at once without that variable.
    pub fn run_test_in_child(&self, name: &str) {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .envs(self.env())
            .env("BLOCKPROOF_TEST_CHILD", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success() && stdout.contains("test result: ok. 1 passed"),
            "child test {name}:\n{stdout}\n{stderr}"
        );
    }

    /// Bytes of object data the node stores.
    pub fn data_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| if e.file_type().unwrap().is_dir() { walk(&e.path()) } else { e.metadata().unwrap().len() })
                .sum()
        }
        walk(&self.data_dir())
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}
