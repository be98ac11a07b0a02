//! A real Garage node (an S3-compatible object store written in Rust) on loopback, one per
//! test: single node, `replication_factor = 1`, sqlite metadata, a bucket and a key made
//! with Garage's own CLI — or a cluster of several nodes ([`Garage::cluster`]: each in a
//! zone of its own, replication factor = the number of nodes), whose endpoints the
//! blockproof processes get as one comma-separated `--s3-endpoint`. The nodes die with the test (SIGKILL on drop, and as the
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

/// One Garage node or a cluster of several (each node a process with its own ports,
/// metadata and data), reached with one key.
pub struct Garage {
    bin: PathBuf,
    nodes: Vec<Node>,
    /// The S3 endpoints of every node, comma-separated (what `--s3-endpoint` takes).
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
}

/// One node: its directory (config, metadata, data, log), its S3 endpoint and process.
struct Node {
    dir: tempfile::TempDir,
    endpoint: String,
    rpc: String,
    child: Option<Child>,
}

/// A port for a node, below the kernel's ephemeral range (32768 and up by default): an
/// ephemeral port that is free now may be taken by any outgoing connection (the tests'
/// own clients) before the node binds it, or while a node is down for a restart on the
/// same ports; a port below the range only by another listener. Never the same port
/// twice in one test process.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = 20_000 + (rand::thread_rng().next_u32() % 12_000) as u16;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
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
    /// Starts a single node (`replication_factor = 1`) with one bucket per name in
    /// `buckets`; `None` (after saying so) when Garage is not installed and not required.
    pub fn start(buckets: &[&str]) -> Option<Garage> {
        Garage::cluster(1, buckets)
    }

    /// Starts `n` nodes on loopback joined into one cluster with replication factor `n`
    /// (each node in a zone of its own), then the key and the buckets.
    pub fn cluster(n: usize, buckets: &[&str]) -> Option<Garage> {
        let Some(bin) = find_garage() else {
            if std::env::var_os("BLOCKPROOF_REQUIRE_S3").is_some_and(|v| v == "1") {
                panic!("BLOCKPROOF_REQUIRE_S3=1 but no garage binary: cargo install garage --locked");
            }
            eprintln!("SKIPPED: garage is not installed (cargo install garage --locked); S3 tests not run");
            return None;
        };
        let secret = hex(32);
        let nodes = (0..n)
            .map(|_| {
                let dir = tempfile::Builder::new().prefix("blockproof-garage-").tempdir().unwrap();
                let (rpc, s3, admin) = (free_port(), free_port(), free_port());
                let d = dir.path().display();
                let config = format!(
                    "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                     replication_factor = {n}\ncompression_level = \"none\"\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                     [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\
                     [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n"
                );
                std::fs::write(dir.path().join("garage.toml"), config).unwrap();
                Node { dir, endpoint: format!("http://127.0.0.1:{s3}"), rpc: format!("127.0.0.1:{rpc}"), child: None }
            })
            .collect::<Vec<_>>();
        let endpoint = nodes.iter().map(|n| n.endpoint.clone()).collect::<Vec<_>>().join(",");
        let mut g = Garage { bin, nodes, endpoint, key_id: format!("GK{}", hex(12)), secret: hex(32) };
        for i in 0..n {
            g.run_server(i);
        }
        let ids: Vec<String> = (0..n)
            .map(|i| g.admin_on(i, &["node", "id", "-q"]).trim().split('@').next().unwrap().to_string())
            .collect();
        for (id, node) in ids.iter().zip(&g.nodes).skip(1) {
            g.admin(&["node", "connect", &format!("{id}@{}", node.rpc)]);
        }
        for (i, id) in ids.iter().enumerate() {
            g.admin(&["layout", "assign", "-z", &format!("dc{}", i + 1), "-c", "10G", id]);
        }
        g.admin(&["layout", "apply", "--version", "1"]);
        let (key_id, secret) = (g.key_id.clone(), g.secret.clone());
        g.admin(&["key", "import", "--yes", "-n", "blockproof", &key_id, &secret]);
        for b in buckets {
            g.admin(&["bucket", "create", b]);
            g.admin(&["bucket", "allow", "--read", "--write", "--owner", b, "--key", &key_id]);
        }
        // Every node has the layout and the key before the first request.
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..n {
            while !g.admin_ok(i, &["key", "info", &key_id]) {
                assert!(Instant::now() < deadline, "garage node {i} never saw the key: {}", g.log());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Some(g)
    }

    fn config(&self, node: usize) -> PathBuf {
        self.nodes[node].dir.path().join("garage.toml")
    }

    /// The S3 endpoint of one node.
    pub fn node_endpoint(&self, node: usize) -> &str {
        &self.nodes[node].endpoint
    }

    fn run_server(&mut self, node: usize) {
        let dir = self.nodes[node].dir.path().to_path_buf();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("garage.log")).unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(self.config(node))
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
        self.nodes[node].child = Some(cmd.spawn().expect("start garage"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.admin_ok(node, &["status"]) {
            assert!(Instant::now() < deadline, "garage did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn admin_ok(&self, node: usize, args: &[&str]) -> bool {
        Command::new(&self.bin).arg("-c").arg(self.config(node)).args(args).output().is_ok_and(|o| o.status.success())
    }

    /// Runs a `garage` admin command on the first node; panics with its output when it
    /// fails.
    pub fn admin(&self, args: &[&str]) -> String {
        self.admin_on(0, args)
    }

    fn admin_on(&self, node: usize, args: &[&str]) -> String {
        let out = Command::new(&self.bin).arg("-c").arg(self.config(node)).args(args).output().unwrap();
        assert!(out.status.success(), "garage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The logs of every node.
    pub fn log(&self) -> String {
        self.nodes
            .iter()
            .map(|n| std::fs::read_to_string(n.dir.path().join("garage.log")).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGKILLs the (first) node, as a crash or a pulled cable would end it.
    pub fn kill(&mut self) {
        self.kill_node(0);
    }

    /// Starts the (first) node again on the same ports and data.
    pub fn restart(&mut self) {
        self.restart_node(0);
    }

    /// SIGKILLs one node.
    pub fn kill_node(&mut self, node: usize) {
        if let Some(mut c) = self.nodes[node].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts one node again on the same ports and data (it rejoins the cluster).
    pub fn restart_node(&mut self, node: usize) {
        self.kill_node(node);
        self.run_server(node);
    }

    /// The environment a blockproof process needs to reach the node(s): every node's
    /// endpoint.
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

    /// Bytes of object data the nodes store. Garage writes a block to a temporary file and
    /// renames it while this walks, so an entry that vanished between the listing and its
    /// stat counts as nothing (the renamed block is counted on the next poll).
    pub fn data_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        self.nodes.iter().map(|n| walk(&n.dir.path().join("data"))).sum()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}
