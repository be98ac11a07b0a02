//! nbdkit servers for tests: slow, failing and lying sources (Debian package `nbdkit`,
//! which scripts/test.sh installs).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Dir;

/// An nbdkit server on a unix socket in the test's directory, stopped when dropped.
pub struct Nbdkit {
    child: Child,
    socket: PathBuf,
}

impl Nbdkit {
    /// Starts `nbdkit PLUGIN_ARGS...` (filters, plugin and its parameters) and waits for
    /// its socket.
    pub fn start(dir: &Dir, name: &str, plugin_args: &[&str]) -> Nbdkit {
        let socket = dir.join(&format!("{name}.sock"));
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&socket)
            .args(plugin_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdkit (apt-get install nbdkit)");
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < Duration::from_secs(20), "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nbdkit { child, socket }
    }

    /// The NBD URI of the export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
