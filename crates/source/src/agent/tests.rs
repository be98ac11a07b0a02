//! The guest agent protocol and the freeze/thaw ordering against a fake agent on a unix
//! socket (a real agent would freeze this host's file systems).

use super::*;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers everything.
    Good,
    /// Accepts connections and never answers.
    Silent,
    /// Refuses guest-fsfreeze-freeze.
    FreezeFails,
    /// Never answers guest-fsfreeze-freeze.
    FreezeHangs,
    /// Has guest-fsfreeze-* disabled (`qemu-ga --allow-rpcs` without them).
    FreezeDisabled,
}

struct Fake {
    path: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

fn fake(mode: Mode) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qga.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let log = l.clone();
            std::thread::spawn(move || serve(conn, mode, &log));
        }
    });
    Fake { path, log, _dir: dir }
}

fn serve(conn: UnixStream, mode: Mode, log: &Mutex<Vec<String>>) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
            return;
        }
        let text: Vec<u8> = line.iter().copied().filter(|&b| b != 0xFF).collect();
        let Ok(msg) = serde_json::from_slice::<Value>(&text) else { continue };
        let cmd = msg["execute"].as_str().unwrap_or("?").to_string();
        log.lock().unwrap().push(cmd.clone());
        if mode == Mode::Silent {
            continue;
        }
        let reply: Vec<u8> = match cmd.as_str() {
            // A stale answer of an earlier client first: the sync must skip it.
            "guest-sync-delimited" => {
                let mut b = b"{\"return\": 7}\n".to_vec();
                b.push(0xFF);
                b.extend(format!("{{\"return\": {}}}\n", msg["arguments"]["id"]).bytes());
                b
            }
            "guest-fsfreeze-freeze" if mode == Mode::FreezeFails => {
                b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"failed to freeze /: Device busy\"}}\n".to_vec()
            }
            "guest-fsfreeze-freeze" if mode == Mode::FreezeHangs => continue,
            // What qemu-ga 10.0 answers.
            c if mode == Mode::FreezeDisabled && c.starts_with("guest-fsfreeze") => format!(
                "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"Command {c} has been disabled: the \
                 command is not allowed\"}}}}\n"
            )
            .into_bytes(),
            "guest-fsfreeze-freeze" | "guest-fsfreeze-thaw" => b"{\"return\": 2}\n".to_vec(),
            _ => b"{\"return\": {}}\n".to_vec(),
        };
        if w.write_all(&reply).is_err() {
            return;
        }
    }
}

fn short() -> Timeouts {
    Timeouts {
        answer: Duration::from_millis(300),
        freeze: Duration::from_millis(300),
        thaw: Duration::from_millis(300),
    }
}

/// What with_frozen returned, with a moment that returns a number.
type Outcome = Result<(u8, Consistency, Option<String>), SourceError>;

/// Runs with_frozen against `path` with a moment that logs itself and returns `ok`.
fn run(path: Option<&Path>, log: &Arc<Mutex<Vec<String>>>, ok: bool) -> (Outcome, Vec<bool>) {
    let mut journal = Vec::new();
    let l = log.clone();
    let r = with_frozen(
        path,
        short(),
        &mut |frozen| {
            journal.push(frozen);
            Ok(())
        },
        move || {
            l.lock().unwrap().push("transaction".into());
            if ok {
                Ok(5)
            } else {
                Err(SourceError::Qemu("transaction failed".into()))
            }
        },
    );
    (r, journal)
}

fn log(f: &Fake) -> Vec<String> {
    f.log.lock().unwrap().clone()
}

#[test]
fn the_view_is_taken_between_freeze_and_thaw() {
    let f = fake(Mode::Good);
    let (r, journal) = run(Some(&f.path), &f.log, true);
    assert_eq!(r.unwrap(), (5, Consistency::Frozen, None));
    assert_eq!(
        log(&f),
        ["guest-sync-delimited", "guest-ping", "guest-fsfreeze-freeze", "transaction", "guest-fsfreeze-thaw"]
    );
    assert_eq!(journal, [true, false], "frozen is journaled before the freeze and cleared after the thaw");
}

#[test]
fn a_failed_transaction_is_thawed_too() {
    let f = fake(Mode::Good);
    let (r, journal) = run(Some(&f.path), &f.log, false);
    assert!(r.unwrap_err().to_string().contains("transaction failed"));
    assert_eq!(log(&f)[2..], ["guest-fsfreeze-freeze", "transaction", "guest-fsfreeze-thaw"]);
    assert_eq!(journal, [true, false]);
}

#[test]
fn a_silent_agent_means_crash_consistent_with_the_reason() {
    let f = fake(Mode::Silent);
    let (r, journal) = run(Some(&f.path), &f.log, true);
    let (v, c, note) = r.unwrap();
    assert_eq!((v, c), (5, Consistency::Crash));
    let note = note.unwrap();
    assert!(note.contains("did not answer guest-sync-delimited"), "{note}");
    assert!(!log(&f).contains(&"guest-fsfreeze-freeze".to_string()), "nothing frozen: {:?}", log(&f));
    assert!(journal.is_empty(), "nothing to journal: {journal:?}");
}

#[test]
fn no_socket_or_nobody_listening_means_crash_consistent() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let (r, _) = run(None, &log, true);
    let (_, c, note) = r.unwrap();
    assert_eq!(c, Consistency::Crash);
    assert!(note.unwrap().contains("no guest agent socket given"));
    let dir = tempfile::tempdir().unwrap();
    let (r, _) = run(Some(&dir.path().join("none.sock")), &log, true);
    let (_, c, note) = r.unwrap();
    assert_eq!(c, Consistency::Crash);
    assert!(note.unwrap().contains("cannot connect to the guest agent socket"));
    assert_eq!(*log.lock().unwrap(), ["transaction", "transaction"], "the view is taken anyway");
}

#[test]
fn a_refused_freeze_is_thawed_and_crash_consistent_with_the_agents_words() {
    let f = fake(Mode::FreezeFails);
    let (r, journal) = run(Some(&f.path), &f.log, true);
    let (_, c, note) = r.unwrap();
    assert_eq!(c, Consistency::Crash);
    let note = note.unwrap();
    assert!(note.contains("did not freeze") && note.contains("Device busy"), "{note}");
    assert_eq!(log(&f)[2..], ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "transaction"]);
    assert_eq!(journal, [true, false]);
}

#[test]
fn a_hung_freeze_is_bounded_and_thawed() {
    let f = fake(Mode::FreezeHangs);
    let (r, journal) = run(Some(&f.path), &f.log, true);
    let (_, c, note) = r.unwrap();
    assert_eq!(c, Consistency::Crash);
    let note = note.unwrap();
    assert!(note.contains("did not answer guest-fsfreeze-freeze"), "{note}");
    let l = log(&f);
    let freeze = l.iter().position(|c| c == "guest-fsfreeze-freeze").unwrap();
    let thaw = l.iter().position(|c| c == "guest-fsfreeze-thaw").unwrap();
    let moment = l.iter().position(|c| c == "transaction").unwrap();
    assert!(freeze < thaw && thaw < moment, "{l:?}");
    assert_eq!(journal, [true, false]);
}

#[test]
fn a_disabled_freeze_froze_nothing() {
    let f = fake(Mode::FreezeDisabled);
    let (r, journal) = run(Some(&f.path), &f.log, true);
    let (_, c, note) = r.unwrap();
    assert_eq!(c, Consistency::Crash);
    assert!(note.unwrap().contains("has been disabled"));
    assert_eq!(log(&f)[2..], ["guest-fsfreeze-freeze", "transaction"], "no thaw of what was never frozen");
    assert_eq!(journal, [true, false]);
}
