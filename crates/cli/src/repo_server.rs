//! `blockproof server`: run a repository server, manage its tokens (on the server's
//! host, in its state directory) and its trash (through the server, with an admin token).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use blockproof_format::Id;
use blockproof_server::token::TokenStore;
use blockproof_server::{Options, RemoteBackend, Role};
use blockproof_store::Backend;
use clap::{Args, Subcommand, ValueEnum};

use crate::args::{RepoArgs, StoreArgs};
use crate::commands::print_json;
use crate::exit;

#[derive(Subcommand, Debug)]
pub enum ServerCommand {
    /// Serve repositories over HTTPS until SIGTERM or SIGINT.
    #[command(
        after_help = "Example:\n  blockproof server serve --state /var/lib/blockproof-server --listen 0.0.0.0:8443 --serve main=/backup/repo"
    )]
    Serve(ServeArgs),
    /// Create, list and revoke the server's tokens (on the server's host).
    #[command(subcommand)]
    Token(TokenCommand),
    /// List and restore what the server keeps in its trash (an admin token).
    #[command(subcommand)]
    Trash(TrashCommand),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The server's state directory: tokens, TLS identity, trash, audit log.
    #[arg(long, env = "BLOCKPROOF_SERVER_STATE", value_name = "DIR")]
    pub state: PathBuf,
    /// Address and port to listen on.
    #[arg(long, default_value = "127.0.0.1:8443", value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// A repository to serve, as NAME=LOCATION (a directory or s3://BUCKET/PREFIX);
    /// clients reach it as https://HOST:PORT/NAME. Repeatable.
    #[arg(long = "serve", value_name = "NAME=LOCATION", required = true)]
    pub serve: Vec<String>,
    /// The certificate chain (PEM); with --key. Without both, a self-signed certificate
    /// is generated into the state directory on the first start and kept.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Another DNS name or IP address for a generated certificate (besides localhost,
    /// 127.0.0.1 and ::1). Repeatable.
    #[arg(long = "name", value_name = "HOST")]
    pub names: Vec<String>,
    /// How long the trash keeps what was removed or replaced before it is purged.
    #[arg(long, default_value = "7days", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub trash_grace: Duration,
    /// The largest request body accepted, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub max_body: u64,
    /// Requests one token may have in progress at once (more are answered 429, and
    /// clients retry).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub per_token: usize,
    /// Connections served at once.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_connections: usize,
    /// The audit log rotates at this size, in MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub audit_max: u64,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// The roles of tokens.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoleArg {
    /// Add new objects, read, take and release its own locks.
    Backup,
    /// Read, take and release its own locks.
    Restore,
    /// Forget, gc, check, repair (removals and replacements go to the trash).
    Maintain,
    /// Everything, including the config, key slots and the trash.
    Admin,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Backup => Role::Backup,
            RoleArg::Restore => Role::Restore,
            RoleArg::Maintain => Role::Maintain,
            RoleArg::Admin => Role::Admin,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print its secret (shown this once).
    #[command(
        after_help = "Example:\n  blockproof server token create --state /var/lib/blockproof-server --name web01 --role backup --repos main"
    )]
    Create(TokenCreateArgs),
    /// List the tokens (never their secrets).
    #[command(after_help = "Example:\n  blockproof server token list --state /var/lib/blockproof-server")]
    List(TokenListArgs),
    /// Revoke a token: its next request fails.
    #[command(after_help = "Example:\n  blockproof server token revoke --state /var/lib/blockproof-server web01")]
    Revoke(TokenRevokeArgs),
}

#[derive(Args, Debug)]
pub struct TokenCreateArgs {
    #[arg(long, env = "BLOCKPROOF_SERVER_STATE", value_name = "DIR")]
    pub state: PathBuf,
    /// The token's name (the audit log's "who"): 1-64 of [A-Za-z0-9_-].
    #[arg(long)]
    pub name: String,
    #[arg(long, value_enum)]
    pub role: RoleArg,
    /// The repositories it may use: a name or a pattern with * and ?.
    #[arg(long, default_value = "*", value_name = "PATTERN")]
    pub repos: String,
    /// The vms whose snapshots it may write and remove: a name or a pattern with * and ?.
    /// A token limited to some vms cannot run gc.
    #[arg(long, default_value = "*", value_name = "PATTERN")]
    pub vms: String,
}

#[derive(Args, Debug)]
pub struct TokenListArgs {
    #[arg(long, env = "BLOCKPROOF_SERVER_STATE", value_name = "DIR")]
    pub state: PathBuf,
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TokenRevokeArgs {
    #[arg(long, env = "BLOCKPROOF_SERVER_STATE", value_name = "DIR")]
    pub state: PathBuf,
    /// The token's name.
    pub name: String,
}

#[derive(Subcommand, Debug)]
pub enum TrashCommand {
    /// List the trash of a repository on a server.
    #[command(after_help = "Example:\n  blockproof server trash list --repo https://backup.example:8443/main")]
    List(TrashListArgs),
    /// Put files back from the trash (by id, or --all).
    #[command(
        after_help = "Example:\n  blockproof server trash restore --repo https://backup.example:8443/main --all"
    )]
    Restore(TrashRestoreArgs),
}

#[derive(Args, Debug)]
pub struct TrashListArgs {
    /// The repository: https://HOST:PORT/NAME.
    #[arg(long, env = "BLOCKPROOF_REPO", value_name = "URL")]
    pub repo: String,
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct TrashRestoreArgs {
    /// Trash entry ids (from `trash list`).
    #[arg(value_name = "ID", required_unless_present = "all")]
    pub ids: Vec<String>,
    /// Every snapshot, index file, pack and key slot in the trash (state documents and
    /// locks only by id).
    #[arg(long, conflicts_with = "ids")]
    pub all: bool,
    /// Print the restored entries as a JSON array.
    #[arg(long)]
    pub json: bool,
    /// The repository (https://HOST:PORT/NAME); its password is needed when snapshots
    /// come back, to drop them from the repository's forget records.
    #[command(flatten)]
    pub repo: RepoArgs,
}

pub fn run(c: ServerCommand) -> Result<u8> {
    match c {
        ServerCommand::Serve(a) => serve(a),
        ServerCommand::Token(TokenCommand::Create(a)) => {
            let secret = TokenStore::new(&a.state).create(&a.name, a.role.into(), &a.repos, &a.vms)?;
            println!("{secret}");
            eprintln!(
                "blockproof: token {} ({}, repositories {}, vms {}): shown this once",
                a.name,
                Role::from(a.role),
                a.repos,
                a.vms
            );
            Ok(exit::OK)
        }
        ServerCommand::Token(TokenCommand::List(a)) => {
            let tokens = TokenStore::new(&a.state).load()?;
            if a.json {
                let list: Vec<serde_json::Value> = tokens
                    .iter()
                    .map(|t| {
                        serde_json::json!({"name": t.name, "role": t.role, "repos": t.repos, "vms": t.vms,
                            "created": t.created, "revoked": t.revoked})
                    })
                    .collect();
                print_json(&list)?;
            } else {
                for t in &tokens {
                    let state = match t.revoked {
                        Some(when) => format!("revoked {}", blockproof_repo::time_text(when)),
                        None => "active".into(),
                    };
                    println!("{:<24} {:<8} repos {:<12} vms {:<12} {state}", t.name, t.role.name(), t.repos, t.vms);
                }
            }
            Ok(exit::OK)
        }
        ServerCommand::Token(TokenCommand::Revoke(a)) => {
            TokenStore::new(&a.state).revoke(&a.name)?;
            eprintln!("blockproof: token {} revoked", a.name);
            Ok(exit::OK)
        }
        ServerCommand::Trash(TrashCommand::List(a)) => {
            let remote = connect(&a.repo, &a.store)?;
            let entries = remote.trash()?;
            if a.json {
                print_json(&entries)?;
            } else if entries.is_empty() {
                println!("the trash is empty");
            } else {
                for e in &entries {
                    println!(
                        "{}  {} {} {} B, {} by {} at {}",
                        e.id,
                        e.kind,
                        e.name,
                        e.size,
                        if e.why == "replace" { "replaced" } else { "removed" },
                        e.token,
                        blockproof_repo::time_text(e.trashed)
                    );
                }
            }
            Ok(exit::OK)
        }
        ServerCommand::Trash(TrashCommand::Restore(a)) => {
            let url = a.repo.location()?;
            let remote = connect(url, &a.repo.store)?;
            let ids: Vec<String> = if a.all {
                remote.trash()?.into_iter().filter(|e| ALL_KINDS.contains(&e.kind.as_str())).map(|e| e.id).collect()
            } else {
                a.ids.clone()
            };
            let mut restored = Vec::new();
            for id in &ids {
                let entry = remote.untrash(id).with_context(|| format!("trash entry {id}"))?;
                if !a.json {
                    println!("restored {} {} ({id})", entry.kind, entry.name);
                }
                restored.push(entry);
            }
            let snapshots: Vec<Id> =
                restored.iter().filter(|e| e.kind == "snapshot").filter_map(|e| e.name.parse().ok()).collect();
            if !snapshots.is_empty() {
                // Put back, they are no longer forgotten: drop them from the records, so
                // that check does not report them as forgotten but present.
                let repo = crate::commands::open_repo(&a.repo)?;
                repo.unrecord_forgotten(&snapshots)?;
            }
            if a.json {
                print_json(&restored)?;
            }
            Ok(exit::OK)
        }
    }
}

/// What `trash restore --all` puts back: the content-addressed kinds, which cannot
/// conflict with what the repository holds now.
const ALL_KINDS: [&str; 4] = ["snapshot", "index", "pack", "key"];

fn connect(url: &str, store: &StoreArgs) -> Result<RemoteBackend> {
    let options = crate::location::client_options(store)?;
    let (remote, _) = RemoteBackend::connect(url, &options).map_err(crate::location::server_error)?;
    Ok(remote)
}

fn serve(a: ServeArgs) -> Result<u8> {
    let mut repos: Vec<(String, Arc<dyn Backend>)> = Vec::new();
    for spec in &a.serve {
        let Some((name, location)) = spec.split_once('=') else {
            return Err(crate::Usage(format!("--serve {spec:?}: expected NAME=LOCATION")).into());
        };
        if !blockproof_server::route::valid_repo_name(name) {
            return Err(crate::Usage(format!("--serve {spec:?}: a name is 1-64 of [A-Za-z0-9_-]")).into());
        }
        if blockproof_server::client::is_server_url(location) {
            return Err(crate::Usage(format!(
                "--serve {spec:?}: a server serves directories and S3, not other servers"
            ))
            .into());
        }
        let mut store = a.store.clone();
        store.no_cache = true;
        // An existing repository, or an empty place an admin token then initialises
        // through the server (`blockproof init --repo https://…`).
        let backend = match crate::location::backend(location, &store, false) {
            Ok(b) => b,
            Err(first) => crate::location::backend(location, &store, true)
                .map_err(|_| first)
                .with_context(|| format!("repository {name}"))?,
        };
        repos.push((name.to_string(), Arc::from(backend)));
    }
    let options = Options {
        listen: a.listen,
        state_dir: a.state.clone(),
        cert: a.cert.clone(),
        key: a.key.clone(),
        names: a.names.clone(),
        trash_grace: a.trash_grace,
        max_body: a.max_body << 20,
        per_token: a.per_token.max(1),
        max_connections: a.max_connections.max(1),
        audit_max: a.audit_max.max(1) << 20,
    };
    let names: Vec<String> = repos.iter().map(|(n, _)| n.clone()).collect();
    blockproof_server::serve(options, repos, |started| {
        if started.generated {
            eprintln!("blockproof: generated a self-signed certificate: {}", started.certificate.display());
        }
        for n in &names {
            println!("serving https://{}/{n}", started.addr);
        }
        println!("certificate {}", started.fingerprint);
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    eprintln!("blockproof: server stopped");
    Ok(exit::OK)
}
