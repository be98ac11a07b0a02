//! Pauses for tests of concurrency and crashes: with the feature `test-hooks` (test
//! builds only) an operation can be held at a named point while a test changes the world
//! around it; without the feature [`pause_at`] does nothing.

/// With `VAR=PATH` in the environment, waits until the file PATH exists (creating
/// `PATH.waiting` while it waits, so a test knows the point was reached).
#[cfg(feature = "test-hooks")]
pub fn pause_at(var: &str) {
    if let Some(path) = std::env::var_os(var) {
        let path = std::path::PathBuf::from(path);
        let mut waiting = path.clone().into_os_string();
        waiting.push(".waiting");
        let _ = std::fs::write(&waiting, b"");
        while !path.exists() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&waiting);
    }
}

/// Does nothing: this build has no test hooks.
#[cfg(not(feature = "test-hooks"))]
pub fn pause_at(_var: &str) {}
