//! Commands the job runs: a vm's pre and post hooks and notification commands. Each runs
//! without a shell (an argv), in a process group of its own, with a timeout: when it
//! expires the whole group is killed, so a hung hook never hangs the job.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// A command with its timeout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hook {
    pub command: Vec<String>,
    #[serde(serialize_with = "crate::report::seconds")]
    pub timeout: Duration,
}

/// What running a command did.
#[derive(Clone, Debug, Serialize)]
pub struct HookRun {
    pub command: Vec<String>,
    /// Its exit code (`None`: killed by a signal, timed out, or never started).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub duration_seconds: f64,
    /// The end of what it printed (stdout and stderr, at most 2 KiB).
    pub output: String,
    /// Why it failed, in one line (`None`: it exited 0).
    pub error: Option<String>,
}

impl HookRun {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Longest output kept from a command.
const OUTPUT_TAIL: usize = 2048;

/// How long the output of a command that has ended is still read (its pipes stay open
/// while a background process it started holds them).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

impl Hook {
    /// Runs the command with `env` added to the environment and `stdin` as its standard
    /// input; waits at most the timeout.
    pub fn run(&self, env: &[(&str, String)], stdin: Option<&[u8]>) -> HookRun {
        let started = Instant::now();
        let mut run = HookRun {
            command: self.command.clone(),
            exit_code: None,
            timed_out: false,
            duration_seconds: 0.0,
            output: String::new(),
            error: None,
        };
        let mut cmd = Command::new(&self.command[0]);
        cmd.args(&self.command[1..])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                run.error = Some(format!("{} cannot be started: {e}", self.command[0]));
                return run;
            }
        };
        let pgid = child.id() as libc::pid_t;
        let feeder = child.stdin.take().zip(stdin.map(<[u8]>::to_vec)).map(|(mut pipe, data)| {
            std::thread::spawn(move || {
                // A command that does not read its input is not an error.
                let _ = pipe.write_all(&data);
            })
        });
        // Output is read by threads that report on a channel: a background process the
        // command started may keep the pipes open long after the command exits, and is
        // not waited for (see below).
        let (sent, finished) = std::sync::mpsc::channel::<()>();
        let pipes = [
            child.stdout.take().map(|o| Box::new(o) as Box<dyn Read + Send>),
            child.stderr.take().map(|e| Box::new(e) as Box<dyn Read + Send>),
        ];
        let mut outputs = Vec::new();
        for mut pipe in pipes.into_iter().flatten() {
            let sent = sent.clone();
            let kept = Arc::new(Mutex::new(Vec::new()));
            outputs.push(Arc::clone(&kept));
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let mut k = kept.lock().unwrap_or_else(|p| p.into_inner());
                            k.extend_from_slice(&buf[..n]);
                            let excess = k.len().saturating_sub(OUTPUT_TAIL);
                            k.drain(..excess);
                        }
                    }
                }
                let _ = sent.send(());
            });
        }
        drop(sent);
        let deadline = started + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => {
                    // SAFETY: kill(2) on the process group the child leads; no memory involved.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                    let _ = child.wait();
                    run.timed_out = true;
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => {
                    run.error = Some(format!("{}: {e}", self.command[0]));
                    // SAFETY: as above.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                    let _ = child.wait();
                    break None;
                }
            }
        };
        // The feeder ends when the command's input closes; it is not waited for.
        drop(feeder);
        // Its output: what the pipes gave until they closed, or until a short grace after
        // the command ended (a background process it started keeps them open: the command
        // is done, and the job goes on).
        let grace = Instant::now() + OUTPUT_GRACE;
        for _ in 0..outputs.len() {
            if finished.recv_timeout(grace.saturating_duration_since(Instant::now())).is_err() {
                break;
            }
        }
        let output: Vec<u8> =
            outputs.iter().flat_map(|o| o.lock().unwrap_or_else(|p| p.into_inner()).clone()).collect();
        let start = output.len().saturating_sub(OUTPUT_TAIL);
        run.output = String::from_utf8_lossy(&output[start..]).into_owned();
        run.duration_seconds = started.elapsed().as_secs_f64();
        run.exit_code = status.and_then(|s| s.code());
        if run.timed_out {
            run.error =
                Some(format!("{} timed out after {} s and was killed", self.command[0], self.timeout.as_secs()));
        } else if let Some(s) = status.filter(|s| !s.success()) {
            let last = run.output.lines().last().unwrap_or("").trim().to_string();
            run.error = Some(match s.code() {
                Some(c) => format!(
                    "{} exited with {c}{}",
                    self.command[0],
                    if last.is_empty() { String::new() } else { format!(": {last}") }
                ),
                None => format!("{} was killed by a signal", self.command[0]),
            });
        }
        run
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(args: &[&str], secs: u64) -> Hook {
        Hook { command: args.iter().map(|s| s.to_string()).collect(), timeout: Duration::from_secs(secs) }
    }

    #[test]
    fn exit_codes_output_environment_and_input() {
        let r = hook(&["sh", "-c", "echo \"vm=$BLOCKPROOF_VM\"; cat; exit 0"], 10)
            .run(&[("BLOCKPROOF_VM", "web01".into())], Some(b"report"));
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.output, "vm=web01\nreport");
        let r = hook(&["sh", "-c", "echo froze badly >&2; exit 4"], 10).run(&[], None);
        assert_eq!(r.exit_code, Some(4));
        assert_eq!(r.error.as_deref(), Some("sh exited with 4: froze badly"));
        let r = hook(&["/no/such/program"], 10).run(&[], None);
        assert!(r.error.unwrap().contains("cannot be started"));
    }

    #[test]
    fn a_background_process_a_hook_starts_does_not_hold_the_job() {
        // The pre hook of a vm may start a server the backup then reads (qemu-nbd, say):
        // it keeps the hook's output pipe open, but the hook is done when its command is.
        let r = hook(&["sh", "-c", "echo started; sleep 20 & exit 0"], 10).run(&[], None);
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.output, "started\n");
        assert!(r.duration_seconds < 10.0, "waited for the background process: {r:?}");
    }

    #[test]
    fn a_hung_hook_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("late");
        // The child of the shell would touch the marker after 3 s if it survived.
        let script = format!("(sleep 3; touch {}) & sleep 30", marker.display());
        let r = Hook { command: vec!["sh".into(), "-c".into(), script], timeout: Duration::from_millis(300) }
            .run(&[], None);
        assert!(r.timed_out && r.error.unwrap().contains("timed out"));
        std::thread::sleep(Duration::from_secs(4));
        assert!(!marker.exists(), "a child of the hook outlived the timeout");
    }
}
