//! What the server does with an authenticated request: the policy applied to the
//! repository's backend, the trash and the audit log. Synchronous (the backends are);
//! the listener runs it on tokio's blocking threads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use blockproof_store::{Backend, Kind, StoreError};

use crate::audit::{Audit, Event};
use crate::policy::{content_addressed, decide, Action, Decision, Role};
use crate::records::Records;
use crate::route::Route;
use crate::token::TokenEntry;
use crate::trash::Trash;

/// One repository the server serves.
pub struct Served {
    pub backend: Arc<dyn Backend>,
    pub trash: Trash,
    pub owners: Records,
    /// The vm each snapshot was declared for when it was written.
    pub vms: Records,
    /// Serializes the check-then-act of writes and removes of files that are not
    /// content-addressed (state documents, locks, config), so two requests cannot both
    /// see a name free, or both trash the same version.
    mutate: Mutex<()>,
}

impl Served {
    pub fn new(backend: Arc<dyn Backend>, state_dir: &std::path::Path, name: &str) -> Served {
        Served {
            backend,
            trash: Trash::new(state_dir, name),
            owners: Records::new(state_dir, "owners", name),
            vms: Records::new(state_dir, "vms", name),
            mutate: Mutex::new(()),
        }
    }
}

/// The repositories of a server, by name.
pub type Repositories = HashMap<String, Served>;

/// An answer: status, body, extra headers.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Answer {
    pub fn ok(body: Vec<u8>) -> Answer {
        Answer { status: 200, body, headers: Vec::new() }
    }

    pub fn text(status: u16, text: impl Into<String>) -> Answer {
        let mut body = text.into().into_bytes();
        body.push(b'\n');
        Answer { status, body, headers: vec![("content-type", "text/plain; charset=utf-8".into())] }
    }
}

fn store_answer(e: StoreError) -> Answer {
    match e {
        StoreError::NotFound { kind, name } => Answer::text(404, format!("{kind} {name} not found")),
        StoreError::Invalid(m) => Answer::text(400, m),
        // The server's own paths stay on the server.
        StoreError::Io { source, .. } => Answer::text(500, format!("the server's store failed: {source}")),
        StoreError::Remote(m) => Answer::text(502, format!("the server's store failed: {m}")),
    }
}

/// What a request acts on, as the audit log names it.
pub struct Target<'a> {
    pub repo: &'a str,
    pub op: &'a str,
    pub kind: Option<Kind>,
    pub name: &'a str,
}

/// The context of one request.
pub struct Request<'a> {
    pub token: &'a TokenEntry,
    /// The vm the client declared its operation is for (header `blockproof-vm`).
    pub vm: Option<String>,
    pub from: String,
    pub audit: &'a Audit,
}

impl Request<'_> {
    fn log(&self, t: &Target<'_>, bytes: u64, outcome: &str, detail: &str) {
        let event = Event {
            time: crate::audit::now_text(),
            from: self.from.clone(),
            token: &self.token.name,
            role: self.token.role.name(),
            repo: t.repo,
            op: t.op,
            kind: t.kind.map(|k| k.name()).unwrap_or(""),
            name: t.name,
            bytes,
            outcome,
            detail,
        };
        if let Err(e) = self.audit.record(&event) {
            eprintln!("blockproof server: audit log: {e}");
        }
    }
}

fn exists(backend: &dyn Backend, kind: Kind, name: &str) -> Result<bool, StoreError> {
    match backend.size(kind, name) {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_nanos()
}

/// Executes a routed, authenticated request for a token that may use the repository.
pub fn execute(repo: &Served, route: Route, body: bytes::Bytes, req: &Request<'_>) -> Answer {
    let token = req.token;
    let b = &*repo.backend;
    match route {
        Route::Info { repo: name } => {
            let info = serde_json::json!({
                "repository": name, "token": token.name, "role": token.role.name(),
                "receipt_times": true, "server": env!("CARGO_PKG_VERSION"),
            });
            Answer::ok(serde_json::to_vec(&info).expect("json"))
        }
        Route::List { kind, .. } => match b.list_sizes(kind) {
            Ok(list) => {
                let mut out = String::new();
                for (n, s) in list {
                    out.push_str(&format!("{n} {s}\n"));
                }
                Answer::ok(out.into_bytes())
            }
            Err(e) => store_answer(e),
        },
        Route::Read { kind, name, range, .. } => {
            let result = match range {
                None => b.read(kind, &name),
                Some((offset, len)) => {
                    let mut buf = vec![0u8; len as usize];
                    b.read_at(kind, &name, offset, &mut buf).map(|()| buf)
                }
            };
            match result {
                Ok(bytes) => Answer::ok(bytes),
                Err(e) => store_answer(e),
            }
        }
        Route::Stat { kind, name, .. } => match b.size(kind, &name).and_then(|s| Ok((s, b.modified(kind, &name)?))) {
            Ok((size, modified)) => Answer {
                status: 200,
                body: Vec::new(),
                headers: vec![
                    ("content-length", size.to_string()),
                    ("blockproof-size", size.to_string()),
                    (crate::route::MODIFIED, nanos(modified).to_string()),
                ],
            },
            Err(e) => store_answer(e),
        },
        Route::Write { repo: rname, kind, name } => write(repo, &rname, kind, &name, body, req),
        Route::Remove { repo: rname, kind, name } => remove(repo, &rname, kind, &name, req),
        Route::TrashList { repo: rname } => {
            if token.role != Role::Admin {
                return refuse(
                    req,
                    &Target { repo: &rname, op: "trash-list", kind: None, name: "" },
                    format!("the {} role may not list the trash", token.role),
                );
            }
            match repo.trash.list() {
                Ok(list) => Answer::ok(serde_json::to_vec(&list).expect("json")),
                Err(e) => Answer::text(500, e.to_string()),
            }
        }
        Route::TrashRestore { repo: rname, id } => {
            if token.role != Role::Admin {
                let why = format!("the {} role may not restore from the trash", token.role);
                return refuse(req, &Target { repo: &rname, op: "trash-restore", kind: None, name: &id }, why);
            }
            restore(repo, &rname, &id, req)
        }
    }
}

fn refuse(req: &Request<'_>, t: &Target<'_>, why: String) -> Answer {
    req.log(t, 0, "refused", &why);
    Answer::text(403, why)
}

fn failed(req: &Request<'_>, t: &Target<'_>, answer: Answer) -> Answer {
    let detail = String::from_utf8_lossy(&answer.body).trim().to_string();
    req.log(t, 0, "failed", &detail);
    answer
}

fn write(repo: &Served, rname: &str, kind: Kind, name: &str, body: bytes::Bytes, req: &Request<'_>) -> Answer {
    let b = &*repo.backend;
    let size = body.len() as u64;
    if content_addressed(kind) && blake3::hash(&body).to_hex().as_str() != name {
        let why = format!("the name of a {kind} file must be the BLAKE3 hash of its bytes");
        req.log(&Target { repo: rname, op: "create", kind: Some(kind), name }, size, "refused", &why);
        return Answer::text(400, why);
    }
    let _serial = (!content_addressed(kind)).then(|| repo.mutate.lock().expect("mutate lock"));
    // A content-addressed file (a key slot aside, which only admin writes) carries the
    // bytes its name says: writing an existing one writes them again, so it is judged as
    // its creation, and the store is not asked first (a HEAD per pack on S3).
    let present = if content_addressed(kind) && kind != Kind::Key {
        false
    } else {
        match exists(b, kind, name) {
            Ok(p) => p,
            Err(e) => {
                return failed(req, &Target { repo: rname, op: "write", kind: Some(kind), name }, store_answer(e))
            }
        }
    };
    let own = kind == Kind::Lock && repo.owners.of(name).as_deref() == Some(req.token.name.as_str());
    let (action, op) = if present { (Action::Overwrite, "replace") } else { (Action::Create, "create") };
    let decision = match out_of_scope(repo, req, action, kind, name) {
        Some(why) => Decision::Refuse(why),
        None => decide(req.token.role, action, kind, name, own),
    };
    match decision {
        Decision::Refuse(why) => return refuse(req, &Target { repo: rname, op, kind: Some(kind), name }, why),
        Decision::KeepOld => {
            if let Err(answer) = to_trash(repo, kind, name, req, "replace") {
                return failed(req, &Target { repo: rname, op, kind: Some(kind), name }, answer);
            }
        }
        Decision::Allow => {}
    }
    if let (Kind::Snapshot, false, Some(vm)) = (kind, present, &req.vm) {
        if let Err(e) = repo.vms.set(name, vm) {
            return failed(req, &Target { repo: rname, op, kind: Some(kind), name }, Answer::text(500, e.to_string()));
        }
    }
    if kind == Kind::Lock && !present {
        if let Err(e) = repo.owners.set(name, &req.token.name) {
            return failed(req, &Target { repo: rname, op, kind: Some(kind), name }, Answer::text(500, e.to_string()));
        }
    }
    match b.write(kind, name, &body) {
        Ok(()) => {
            req.log(&Target { repo: rname, op, kind: Some(kind), name }, size, "ok", "");
            Answer { status: 201, body: Vec::new(), headers: Vec::new() }
        }
        Err(e) => failed(req, &Target { repo: rname, op, kind: Some(kind), name }, store_answer(e)),
    }
}

/// Why a token limited to some vms may not do this, if it may not: it writes snapshots
/// only of the vms it declares and its pattern matches, removes only snapshots recorded
/// for such vms, and never removes packs or index files (gc needs a token for every vm).
fn out_of_scope(repo: &Served, req: &Request<'_>, action: Action, kind: Kind, name: &str) -> Option<String> {
    let t = req.token;
    if !t.vm_scoped() {
        return None;
    }
    match (kind, action) {
        (Kind::Snapshot, Action::Create) => match &req.vm {
            Some(vm) if t.may_touch_vm(vm) => None,
            Some(vm) => Some(format!("token {} may not write snapshots of vm {vm} (its vms: {})", t.name, t.vms)),
            None => Some(format!("token {} is limited to vms {} and the client declared no vm", t.name, t.vms)),
        },
        (Kind::Snapshot, Action::Remove) => match repo.vms.of(name) {
            Some(vm) if t.may_touch_vm(&vm) => None,
            Some(vm) => Some(format!("token {} may not remove snapshots of vm {vm} (its vms: {})", t.name, t.vms)),
            None => {
                Some(format!("token {} may not remove snapshot {name}: the server has no record of its vm", t.name))
            }
        },
        (Kind::Pack | Kind::Index, Action::Remove) => Some(format!(
            "token {} is limited to vms {}: removing packs and index files (gc) needs a token for every vm",
            t.name, t.vms
        )),
        _ => None,
    }
}

/// Puts the current version of a file into the trash (a missing file needs nothing).
fn to_trash(repo: &Served, kind: Kind, name: &str, req: &Request<'_>, why: &str) -> Result<(), Answer> {
    match repo.backend.read(kind, name) {
        Ok(bytes) => repo
            .trash
            .put(kind, name, &bytes, &req.token.name, why)
            .map(|_| ())
            .map_err(|e| Answer::text(500, e.to_string())),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(store_answer(e)),
    }
}

fn remove(repo: &Served, rname: &str, kind: Kind, name: &str, req: &Request<'_>) -> Answer {
    let _serial = repo.mutate.lock().expect("mutate lock");
    let own = kind == Kind::Lock && repo.owners.of(name).as_deref() == Some(req.token.name.as_str());
    let decision = match out_of_scope(repo, req, Action::Remove, kind, name) {
        Some(why) => Decision::Refuse(why),
        None => decide(req.token.role, Action::Remove, kind, name, own),
    };
    match decision {
        Decision::Refuse(why) => {
            return refuse(req, &Target { repo: rname, op: "remove", kind: Some(kind), name }, why)
        }
        Decision::KeepOld => {
            if let Err(answer) = to_trash(repo, kind, name, req, "remove") {
                return failed(req, &Target { repo: rname, op: "remove", kind: Some(kind), name }, answer);
            }
        }
        Decision::Allow => {}
    }
    match repo.backend.remove(kind, name) {
        Ok(()) => {
            if kind == Kind::Lock {
                repo.owners.clear(name);
            }
            if kind == Kind::Snapshot {
                repo.vms.clear(name);
            }
            req.log(&Target { repo: rname, op: "remove", kind: Some(kind), name }, 0, "ok", "");
            Answer { status: 204, body: Vec::new(), headers: Vec::new() }
        }
        Err(e) => failed(req, &Target { repo: rname, op: "remove", kind: Some(kind), name }, store_answer(e)),
    }
}

fn restore(repo: &Served, rname: &str, id: &str, req: &Request<'_>) -> Answer {
    let _serial = repo.mutate.lock().expect("mutate lock");
    let (entry, bytes) = match repo.trash.get(id) {
        Ok(Some(found)) => found,
        Ok(None) => return Answer::text(404, format!("no trash entry {id}")),
        Err(e) => {
            return failed(
                req,
                &Target { repo: rname, op: "trash-restore", kind: None, name: id },
                Answer::text(500, e.to_string()),
            )
        }
    };
    let Some(kind) = entry.kind() else { return Answer::text(500, format!("trash entry {id}: unknown kind")) };
    match repo.backend.read(kind, &entry.name) {
        Ok(current) if current == bytes => {}
        Ok(_) => {
            let why = format!("{kind} {} exists with other bytes: remove or replace it first", entry.name);
            return failed(
                req,
                &Target { repo: rname, op: "trash-restore", kind: Some(kind), name: &entry.name },
                Answer::text(409, why),
            );
        }
        Err(e) if e.is_not_found() => {
            if let Err(e) = repo.backend.write(kind, &entry.name, &bytes) {
                return failed(
                    req,
                    &Target { repo: rname, op: "trash-restore", kind: Some(kind), name: &entry.name },
                    store_answer(e),
                );
            }
        }
        Err(e) => {
            return failed(
                req,
                &Target { repo: rname, op: "trash-restore", kind: Some(kind), name: &entry.name },
                store_answer(e),
            )
        }
    }
    if let Err(e) = repo.trash.discard(id) {
        return Answer::text(500, e.to_string());
    }
    req.log(
        &Target { repo: rname, op: "trash-restore", kind: Some(kind), name: &entry.name },
        bytes.len() as u64,
        "ok",
        id,
    );
    Answer::ok(serde_json::to_vec(&entry).expect("json"))
}
