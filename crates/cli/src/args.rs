//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// blockproof: block-level backup of virtual-machine disks that proves every backup
/// equals its source.
///
/// The password comes from BLOCKPROOF_PASSWORD, --password-file, or a prompt on a
/// terminal. Exit codes: 0 success; 1 error (nothing half-written is visible); 2 usage
/// error; 3 the backup was stored but verification found source and backup differ.
#[derive(Parser, Debug)]
#[command(name = "blockproof", version, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Progress on stderr: auto (bars on a terminal; elsewhere a line with rate and time
    /// left every --progress-interval), always (also a line when each phase starts and
    /// ends), never.
    #[arg(long, value_enum, global = true, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub progress_interval: u64,
    /// No progress output (--progress never); errors and warnings are still shown.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// A progress line when each phase starts and ends (--progress always).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Print times in the local zone with its offset (default: UTC, `...Z`). JSON output
    /// keeps UTC.
    #[arg(long, global = true)]
    pub local_time: bool,
}

/// `--progress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// Bars on a terminal; elsewhere a line every --progress-interval.
    Auto,
    /// As auto, and a line when each phase starts and ends.
    Always,
    /// None.
    Never,
}

impl Cli {
    /// The progress setting the global options ask for.
    pub fn progress_setting(&self) -> crate::progress::Setting {
        let mode = if self.quiet {
            ProgressMode::Never
        } else if self.verbose {
            ProgressMode::Always
        } else {
            self.progress
        };
        crate::progress::Setting { mode, interval: std::time::Duration::from_secs(self.progress_interval) }
    }
}

#[derive(Args, Debug, Clone)]
pub struct RepoArgs {
    /// Repository location: a directory, s3://BUCKET/PREFIX (credentials and region
    /// from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), or a repository
    /// server's https://HOST:PORT/NAME (a token in BLOCKPROOF_TOKEN or --token-file).
    /// Required, here or in BLOCKPROOF_REPO.
    #[arg(long, env = "BLOCKPROOF_REPO", value_name = "REPO")]
    pub repo: Option<String>,
    /// Read the password from the first line of this file.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
}

impl RepoArgs {
    /// The repository location, from `--repo` or BLOCKPROOF_REPO.
    pub fn location(&self) -> Result<&str, crate::Usage> {
        self.repo
            .as_deref()
            .ok_or_else(|| crate::Usage("no repository given: use --repo REPO or set BLOCKPROOF_REPO".into()))
    }
}

/// How to reach repositories on object storage (ignored for directories).
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// S3 endpoint of a non-AWS service (MinIO, Garage, Ceph), e.g. http://127.0.0.1:3900;
    /// several, separated by commas, for the nodes of a cluster: requests fail over
    /// between them.
    #[arg(long, env = "BLOCKPROOF_S3_ENDPOINT", value_name = "URL[,URL…]", value_delimiter = ',')]
    pub s3_endpoint: Vec<String>,
    /// Path-style bucket addressing (always used when --s3-endpoint is given).
    #[arg(long, env = "BLOCKPROOF_S3_PATH_STYLE")]
    pub s3_path_style: bool,
    /// Give up on a failing S3 request after retrying this many seconds.
    #[arg(long, env = "BLOCKPROOF_S3_RETRY_TIMEOUT", value_name = "SECS", default_value_t = blockproof_s3::S3Options::DEFAULT_RETRY_TIMEOUT_SECS)]
    pub s3_retry_timeout: u64,
    /// Pack uploads in flight at once.
    #[arg(long, env = "BLOCKPROOF_S3_UPLOADS", value_name = "N", default_value_t = blockproof_s3::S3Options::DEFAULT_UPLOADS,
          value_parser = clap::value_parser!(u16).range(1..=16))]
    pub s3_uploads: u16,
    /// Local caches (disposable): the blob index of every repository, and the index files
    /// and manifests of S3 and served repositories.
    #[arg(long, env = "BLOCKPROOF_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// No local caches: the blob index is loaded into memory from the index files.
    #[arg(long, env = "BLOCKPROOF_NO_CACHE")]
    pub no_cache: bool,
    /// Repository servers (https://HOST:PORT/NAME): read the token from the first line
    /// of this file (else BLOCKPROOF_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Repository servers: trust the server whose certificate has this SHA-256
    /// fingerprint (printed by `blockproof server serve`), e.g. sha256:3f…
    #[arg(long, env = "BLOCKPROOF_SERVER_FINGERPRINT", value_name = "FINGERPRINT")]
    pub server_fingerprint: Option<String>,
    /// Repository servers: trust certificates issued by the CA in this PEM file (else the
    /// system's roots, when no fingerprint is given).
    #[arg(long, env = "BLOCKPROOF_SERVER_CA", value_name = "FILE")]
    pub server_ca: Option<PathBuf>,
    /// The vm the command works on, declared to a repository server (set by the
    /// command, not an option).
    #[arg(skip)]
    pub vm: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new, empty, encrypted repository.
    #[command(after_help = "Example:\n  blockproof init --repo /backup/repo")]
    Init(InitArgs),
    /// Back up the disks of a vm into one new snapshot.
    #[command(
        after_help = "Example:\n  blockproof backup --repo /backup/repo --vm web01 --disk id=web01-os,source=/images/web01.qcow2,cbt=bitmap:auto"
    )]
    Backup(BackupArgs),
    /// List snapshots, oldest first.
    #[command(after_help = "Example:\n  blockproof snapshots --repo /backup/repo --vm web01")]
    Snapshots(VmArgs),
    /// Restore one disk of a snapshot to a file or block device, or every disk of it into
    /// a directory.
    #[command(
        after_help = "Examples:\n  blockproof restore --repo /backup/repo web01:latest --disk web01-os --to /restore/web01-os.qcow2\n  blockproof restore --repo /backup/repo web01:latest --to /restore/web01 --format qcow2"
    )]
    Restore(RestoreArgs),
    /// Serve a snapshot's disks as read-only NBD exports (named by disk id), for
    /// qemu-img, qemu-nbd clients, nbdcopy, or a VM booting from a qcow2 overlay.
    #[command(
        after_help = "Example:\n  blockproof serve-nbd --repo /backup/repo web01:latest --socket /run/web01.sock"
    )]
    ServeNbd(ServeArgs),
    /// Mount a snapshot read-only over FUSE: per disk id a directory with disk.raw (the
    /// disk's bytes) and partN (or fs) with each readable filesystem's files. Stays in the
    /// foreground until unmounted (fusermount3 -u) or stopped (Ctrl-C, SIGTERM).
    #[command(after_help = "Example:\n  blockproof mount --repo /backup/repo web01:latest /mnt/web01")]
    Mount(MountArgs),
    /// Per vm, the latest snapshot and how much of each disk has been confirmed against
    /// its source. With --max-age, a check for missed backups (Nagios, Icinga): exit 1
    /// naming every vm whose last good restore point is older.
    #[command(after_help = "Example:\n  blockproof status --repo /backup/repo --max-age 26h")]
    Status(StatusArgs),
    /// Stored against protected bytes, deduplication, growth of the last runs, per vm and
    /// disk.
    #[command(after_help = "Example:\n  blockproof stats --repo /backup/repo --vm web01")]
    Stats(VmArgs),
    /// Remove snapshots, by id or by a retention policy per vm (data is freed by gc).
    #[command(
        after_help = "Example:\n  blockproof forget --repo /backup/repo --keep-daily 14 --keep-weekly 8 --prune"
    )]
    Forget(ForgetArgs),
    /// Garbage collection: delete packs no snapshot needs, repack sparse ones. Safe while
    /// backups run: what they may still use is deferred to a later gc.
    #[command(alias = "prune")]
    #[command(after_help = "Example:\n  blockproof gc --repo /backup/repo --dry-run")]
    Gc(GcArgs),
    /// Protect a snapshot from forget.
    #[command(after_help = "Example:\n  blockproof protect --repo /backup/repo web01:latest")]
    Protect(SnapshotRefArgs),
    /// Lift a snapshot's protection.
    #[command(after_help = "Example:\n  blockproof unprotect --repo /backup/repo web01:tag=before-upgrade")]
    Unprotect(SnapshotRefArgs),
    /// Remove stale locks (of processes that are gone), or with --all every lock.
    #[command(after_help = "Example:\n  blockproof unlock --repo /backup/repo")]
    Unlock(UnlockArgs),
    /// Tear down what an interrupted `backup --from` left in a running VM (exports,
    /// jobs, overlays, bitmaps, libvirt backup jobs, scratch files and checkpoints),
    /// exactly as its journal names it. The next backup of the
    /// vm does this itself.
    #[command(after_help = "Example:\n  blockproof cleanup --vm web01")]
    Cleanup(CleanupArgs),
    /// Rebuild the index from the packs, salvage damaged packs, and report per snapshot
    /// and disk what is lost (a backup of the same content makes it whole again). Reads
    /// every pack; holds the exclusive lock. Exit 1 when data remain lost.
    #[command(after_help = "Example:\n  blockproof repair --repo /backup/repo --dry-run")]
    Repair(RepairArgs),
    /// Copy snapshots to a second repository (another site; other keys allowed). Only what
    /// the target lacks is transferred.
    #[command(
        after_help = "Example:\n  BLOCKPROOF_TO_PASSWORD=... blockproof copy --repo /backup/repo --to s3://offsite/blockproof"
    )]
    Copy(CopyArgs),
    /// Manage key slots: the passphrases that open the repository.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Run a repository server, and manage its tokens and trash.
    #[command(subcommand)]
    Server(crate::repo_server::ServerCommand),
    /// Compare a snapshot with its sources now, without taking a backup (exit 3 when they
    /// differ). Reads only; nothing is written.
    #[command(
        after_help = "Example:\n  blockproof verify --repo /backup/repo web01:latest --disk id=web01-os,source=/images/web01.qcow2 --verify all"
    )]
    Verify(VerifyArgs),
    /// Check the repository's structure, and with --read-data its stored data.
    #[command(after_help = "Example:\n  blockproof check --repo /backup/repo --read-data 5%")]
    Check(CheckArgs),
    /// The byte ranges of each disk that differ between two snapshots (from their
    /// indexes: no data is read).
    #[command(
        after_help = "Example:\n  blockproof diff --repo /backup/repo web01:latest~1 web01:latest --disk web01-os"
    )]
    Diff(DiffArgs),
    /// A self-contained tour: back up a generated disk, change it, back up again,
    /// restore both and prove them bit-exact.
    #[command(after_help = "Example:\n  blockproof demo")]
    Demo(DemoArgs),
    /// List a disk's partitions and the filesystems on them.
    #[command(after_help = "Example:\n  blockproof partitions --repo /backup/repo web01:latest --disk web01-os")]
    Partitions(crate::files::PartitionsArgs),
    /// List a directory (or show a file) inside a disk's filesystem, without mounting.
    #[command(
        after_help = "Example:\n  blockproof ls --repo /backup/repo web01:latest --disk web01-os --partition 1 /etc"
    )]
    Ls(crate::files::LsArgs),
    /// Write a file from inside a disk's filesystem to standard output.
    #[command(
        after_help = "Example:\n  blockproof cat --repo /backup/repo web01:latest --disk web01-os --partition 1 /etc/fstab"
    )]
    Cat(crate::files::CatArgs),
    /// Copy files and directories out of a disk's filesystem into a directory, with
    /// their times (and modes, on ext2/3/4).
    #[command(
        after_help = "Example:\n  blockproof restore-files --repo /backup/repo web01:latest --disk web01-os /etc --to /restore"
    )]
    RestoreFiles(crate::files::RestoreFilesArgs),
    /// Prove a restore point restores: walk every filesystem of its disks (every
    /// directory and entry, a sample of the files read to the end, named paths checked),
    /// with a verdict per filesystem; or, with --boot, boot it in an isolated, throwaway
    /// VM until a check passes. Recorded in the repository.
    #[command(
        after_help = "Examples:\n  blockproof restore-test --repo /backup/repo web01:latest --sample 10% --expect /etc/hostname\n  blockproof restore-test --repo /backup/repo web01:latest --boot --console-marker 'login:' --timeout 10m"
    )]
    RestoreTest(crate::restore_test::RestoreTestArgs),
    /// Instant recovery: start the VM from a restore point at once (its disks served from
    /// the repository under local qcow2 images that take its writes) and copy the disks
    /// into those images while it runs; ends when the VM runs on ordinary local disks.
    /// --resume carries on a recovery that was stopped.
    #[command(
        after_help = "Examples:\n  blockproof recover --repo /backup/repo web01:latest --dir /var/lib/vms/web01 --qemu-arg=-nic --qemu-arg=bridge,br=br0\n  blockproof recover --repo /backup/repo --resume --dir /var/lib/vms/web01"
    )]
    Recover(crate::recover::RecoverArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Example:\n  blockproof completions bash > /etc/bash_completion.d/blockproof")]
    Completions(CompletionsArgs),
    #[command(after_help = "Example:\n  blockproof man --to /usr/local/share/man/man1")]
    /// Write the manual pages (blockproof.1 and one per command) into a directory.
    Man(ManArgs),
    /// Run a job file: back up its vms (N at a time; one vm's failure never stops the
    /// others), apply retention and gc when due, copy to the second repository, write the
    /// reports (JSON, HTML, Prometheus) and notify. Exit 0 all good, 3 any tainted, 1 any
    /// failed, 2 the job file is invalid.
    #[command(after_help = "Example:\n  blockproof run /etc/blockproof/nightly.toml --dry-run")]
    Run(RunArgs),
    /// Print (or write) the systemd service and timer that run a job on its [schedule],
    /// and the equivalent crontab line.
    #[command(after_help = "Example:\n  blockproof schedule /etc/blockproof/nightly.toml --write /etc/systemd/system")]
    Schedule(ScheduleArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Chunk size for disks in this repository (a power of two, 4KiB to 4MiB).
    #[arg(long, default_value = "64KiB", value_name = "SIZE")]
    pub chunk_size: String,
    /// Target size of pack files (chunks are grouped into packs of about this size).
    #[arg(long, default_value = "16MiB", value_name = "SIZE")]
    pub pack_size: String,
    /// Compression of new chunks: lz4 (fastest; the default), zstd (smaller, about half
    /// the speed) or zstd:LEVEL (-7 to 22). Fixed for the repository's life.
    #[arg(long, default_value = "lz4", value_name = "CODEC")]
    pub compression: String,
    /// Argon2id memory cost of the key slot, in MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub kdf_memory: u32,
    /// Argon2id passes over memory.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub kdf_iterations: u32,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Name of the vm; its disks are backed up together into one snapshot.
    #[arg(long)]
    pub vm: String,
    /// A disk: id=ID,source=SOURCE[,cbt=CBT][,verify=BUDGET]. Repeat for each disk. The
    /// id is the disk's stable identity (never its position): incrementals follow it.
    /// SOURCE: a raw file or block device, nbd://HOST:PORT/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH, or a .qcow2/.vmdk/.vhdx/.vdi image. CBT: none,
    /// bitmap:NAME, bitmap:auto (qcow2) or changes:FILE (VMware change list JSON).
    #[arg(long = "disk", value_name = "SPEC", required_unless_present = "from", conflicts_with = "from")]
    pub disks: Vec<String>,
    /// A running VM instead of --disk specs: qmp:SOCKET[,nbd=PATH][,qga=PATH] (a QEMU
    /// process or a qemu-storage-daemon, over QMP; nbd=: the unix socket of the NBD
    /// server the process already runs; qga=: the host end of the guest agent's channel,
    /// to freeze the guest's file systems while the view is taken), or
    /// libvirt:DOMAIN[,uri=URI] (a libvirt domain, default URI qemu:///system, through
    /// virsh). Every disk is backed up (its id is the node name; for libvirt the disk's
    /// serial or wwn, else its target dev) from a point-in-time view blockproof sets up
    /// and removes (docs/LIVE-VMS.md).
    #[arg(long, value_name = "VM-SOURCE")]
    pub from: Option<String>,
    /// With --from: after a mismatch (exit 3, not healed) keep the point-in-time view
    /// this long for investigation (its NBD exports are in the report), then release it
    /// (default 1h; 0 releases it at once). `cleanup --vm NAME` or the vm's next backup
    /// releases it earlier.
    #[arg(long, value_name = "DURATION", value_parser = parse_keep, requires = "from")]
    pub keep_view: Option<std::time::Duration>,
    /// Private directory (0700) for --from's journal and temporary overlays (default
    /// $XDG_STATE_HOME/blockproof, or ~/.local/state/blockproof). The VM's process must
    /// be able to use it.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// Budget for comparing chunks change tracking called unchanged with the source, per
    /// disk and run (10% | 2GiB | 500ios | 30s | until=06:00 | all | none, comma-separated,
    /// the smallest wins; default 5%). The first chunk of each disk is compared every run
    /// unless the budget is none. A mismatch stores the snapshot as tainted and exits 3.
    #[arg(long, value_name = "BUDGET")]
    pub verify: Option<String>,
    /// What to do when verification finds a mismatch (after comparing around it, so the
    /// whole stale extent it can find is reported).
    #[arg(long, value_enum, default_value_t = MismatchAction::Keep)]
    pub on_mismatch: MismatchAction,
    /// Read every block of every disk (an active full).
    #[arg(long)]
    pub full: bool,
    /// One run per vm at a time: when another backup of the same vm (or a command that
    /// locks the repository) is running, wait up to SECS for it to finish, then fail
    /// naming it (default: fail at once).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub lock_wait: u64,
    /// A tag to attach to the snapshot (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CleanupArgs {
    /// The vm whose journal to undo (a killed run's leftovers, or a view kept after a
    /// mismatch).
    #[arg(long)]
    pub vm: String,
    /// The state directory the backup used (see backup --state-dir).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// Only a view kept after a mismatch, and only once its time is up: wait until then,
    /// release it, and return early if something else releases it first (what backup
    /// starts, detached, for each kept view).
    #[arg(long)]
    pub when_expired: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ForgetArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Snapshots to forget (ids, unique prefixes, VM:latest, VM:latest~N, ...); or use --keep-* options.
    #[arg(value_name = "SNAP")]
    pub snapshots: Vec<String>,
    /// Keep the N newest snapshots (per vm).
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the last N days that have one (UTC).
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the last N years that have one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot younger than this before the vm's newest (e.g. 7d, 12h, 2w).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub keep_within: Option<std::time::Duration>,
    /// Keep every snapshot with this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub keep_tag: Vec<String>,
    /// Apply the policy per disk (a disk's last restore point always stays, even when
    /// later backups left the disk out) or per vm as a whole.
    #[arg(long, value_enum, default_value_t = Scope::Disk)]
    pub per: Scope,
    /// Apply the policy to this vm only.
    #[arg(long)]
    pub vm: Option<String>,
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run gc afterwards.
    #[arg(long)]
    pub prune: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Repack a pack when at least this share of it is unreferenced (e.g. 25%).
    #[arg(long, value_name = "PERCENT", default_value = "25%")]
    pub repack_threshold: String,
    /// Also rewrite cold packs (see --older-than) holding LZ4 blobs with zstd, oldest
    /// first, within this budget: 10% or 2GiB of those packs, 50ios (packs), 10m,
    /// until=06:00, or all (alone: all).
    #[arg(long, value_name = "BUDGET", num_args = 0..=1, default_missing_value = "all")]
    pub recompress: Option<String>,
    /// With --recompress: only packs last written at least this long ago (e.g. 30d, 12h;
    /// 0 for every pack).
    #[arg(long, value_name = "DURATION", default_value = "7d", requires = "recompress", value_parser = parse_age)]
    pub older_than: std::time::Duration,
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RepairArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Show what would be done; write and remove nothing (and take no lock).
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SnapshotRefArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Snapshot: id, unique id prefix, VM:latest, VM:latest~N, VM:tag=TAG or VM:before=TIME.
    #[arg(value_name = "SNAP")]
    pub snapshot: String,
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The target repository (a directory or s3://BUCKET/PREFIX, reached with the same
    /// S3 options). Its password comes from BLOCKPROOF_TO_PASSWORD, --to-password-file,
    /// or a prompt.
    #[arg(long, value_name = "REPO2")]
    pub to: String,
    /// Read the target's password from the first line of this file.
    #[arg(long, value_name = "FILE")]
    pub to_password_file: Option<PathBuf>,
    /// Snapshots to copy (ids, prefixes, VM:latest, VM:tag=TAG, ...); default: all.
    #[arg(value_name = "SNAP")]
    pub snapshots: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List the key slots.
    #[command(after_help = "Example:\n  blockproof key list --repo /backup/repo")]
    List(KeyListArgs),
    /// Add a key slot for a new passphrase (from BLOCKPROOF_NEW_PASSWORD,
    /// --new-password-file, or a prompt).
    #[command(after_help = "Example:\n  BLOCKPROOF_NEW_PASSWORD=... blockproof key add --repo /backup/repo")]
    Add(KeyAddArgs),
    /// Remove a key slot by its id prefix (never the last one).
    #[command(after_help = "Example:\n  blockproof key remove --repo /backup/repo 3f9a")]
    Remove(KeyRemoveArgs),
    /// Change the passphrase of the slot that opens the repository: add a slot for the
    /// new passphrase, then remove the old slot.
    #[command(after_help = "Example:\n  blockproof key passwd --repo /backup/repo")]
    Passwd(KeyAddArgs),
}

#[derive(Args, Debug)]
pub struct KeyListArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct KeyAddArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Read the new passphrase from the first line of this file.
    #[arg(long, value_name = "FILE")]
    pub new_password_file: Option<PathBuf>,
    /// Argon2id memory for the new slot, in MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub kdf_memory: u32,
    /// Argon2id passes for the new slot.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub kdf_iterations: u32,
}

#[derive(Args, Debug)]
pub struct KeyRemoveArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The slot's id or a unique prefix of it (see key list).
    pub slot: String,
}

#[derive(Args, Debug)]
pub struct UnlockArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Remove every lock, also those of processes that may still run (dangerous).
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Snapshot: id, unique id prefix, VM:latest, VM:latest~N, VM:tag=TAG or VM:before=TIME.
    #[arg(value_name = "SNAP")]
    pub snapshot: String,
    /// A disk and its source now: id=ID,source=SOURCE (cbt= is ignored). Repeatable.
    #[arg(long = "disk", value_name = "SPEC", required = true)]
    pub disks: Vec<String>,
    /// How much to compare per disk (10% | 2GiB | 500ios | 30s | all | none; default 5%),
    /// least recently confirmed chunks first, the first chunk always.
    #[arg(long, value_name = "BUDGET")]
    pub verify: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Snapshot: id, unique id prefix, VM:latest, VM:latest~N, VM:tag=TAG or VM:before=TIME.
    #[arg(value_name = "SNAP")]
    pub snapshot: String,
    /// Export only this disk (default: every disk of the snapshot).
    #[arg(long, value_name = "ID", value_parser = crate::disk_spec::disk_id)]
    pub disk: Option<String>,
    /// Listen on this unix socket (clients: nbd+unix:///DISK?socket=PATH).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Listen on this TCP address, e.g. 127.0.0.1:10809 (clients: nbd://HOST:PORT/DISK).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Memory for cached chunks, in MiB (default 64).
    #[arg(long, value_name = "MIB")]
    pub cache_mib: Option<usize>,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Snapshot: id, unique id prefix, VM:latest, VM:latest~N, VM:tag=TAG or VM:before=TIME.
    #[arg(value_name = "SNAP")]
    pub snapshot: String,
    /// The directory to mount on (it must exist).
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,
    /// Show only this disk (default: every disk of the snapshot).
    #[arg(long, value_name = "ID", value_parser = crate::disk_spec::disk_id)]
    pub disk: Option<String>,
    /// Memory for cached chunks per disk, in MiB (default 64).
    #[arg(long, value_name = "MIB")]
    pub cache_mib: Option<usize>,
}

/// A repository and, optionally, one vm (snapshots, status, stats).
#[derive(Args, Debug)]
pub struct VmArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Only this vm.
    #[arg(long)]
    pub vm: Option<String>,
    /// Print the report as JSON (its fields: docs/JSON.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub vms: VmArgs,
    /// Exit 1, naming them, when a vm's newest restore point with status ok is older than
    /// this (e.g. 26h, 2d) or it has none.
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
    pub max_age: Option<std::time::Duration>,
    /// A vm that must have a recent good restore point even if the repository holds none
    /// of it (repeatable; with --max-age).
    #[arg(long, value_name = "VM", requires = "max_age")]
    pub expect: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Snapshot: id, unique id prefix, VM:latest, VM:latest~N, VM:tag=TAG or VM:before=TIME.
    #[arg(value_name = "SNAP")]
    pub snapshot: String,
    /// The disk id to restore. Without it, every disk of the snapshot is restored into
    /// the directory --to, as DISK.raw (or DISK.qcow2 with --format qcow2).
    #[arg(long, value_name = "ID", value_parser = crate::disk_spec::disk_id)]
    pub disk: Option<String>,
    /// Target: a new file (written sparse), an existing block device, or with --force an
    /// existing file to replace. Without --disk: a directory (created if missing).
    #[arg(long, value_name = "PATH")]
    pub to: PathBuf,
    /// Replace an existing regular file.
    #[arg(long)]
    pub force: bool,
    /// Restore only from this byte offset of the disk (with --length; 64KiB, 1GiB, ...),
    /// written at the same offset of the target.
    #[arg(long, value_name = "SIZE", requires_all = ["length", "disk"])]
    pub offset: Option<String>,
    /// Restore only this many bytes (with --offset).
    #[arg(long, value_name = "SIZE", requires = "offset")]
    pub length: Option<String>,
    /// Target format: raw (sparse file or block device) or qcow2 (through qemu-img).
    /// Default: qcow2 when --to ends in .qcow2, else raw.
    #[arg(long, value_enum)]
    pub format: Option<TargetFormat>,
    /// Write into the existing raw image at --to (a restore of this disk, or the disk
    /// itself) only the known-good bytes of the ranges verification found stale in this
    /// snapshot — tainted or suspect — from the restore point that re-read them; nothing
    /// else is written. For a tainted snapshot this yields its healed twin.
    #[arg(long, conflicts_with_all = ["force", "offset", "length"], requires = "disk")]
    pub patch_tainted: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// The directory to write the pages into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The earlier snapshot (id, prefix, VM:latest~N, ...).
    pub from: String,
    /// The later snapshot.
    pub to: String,
    /// Only this disk.
    #[arg(long, value_name = "ID", value_parser = crate::disk_spec::disk_id)]
    pub disk: Option<String>,
    /// Also the files that changed, in every filesystem of a changed disk that both
    /// snapshots hold (added, removed, modified by size, time, mode or link target;
    /// contents are not compared). Reads both filesystems' metadata.
    #[arg(long)]
    pub files: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Also read stored data and verify every blob against its id, within a budget
    /// (`--read-data 10%` or `--read-data=10%`; alone: all).
    #[arg(long, value_name = "BUDGET", num_args = 0..=1, default_missing_value = "all")]
    pub read_data: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Work in this directory and keep it (default: a temporary directory, removed at
    /// the end).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `--on-mismatch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MismatchAction {
    /// Commit the tainted snapshot; the next backup reads the disk in full.
    Keep,
    /// Also re-read the tainted disks in full now and commit a second, clean snapshot.
    Heal,
    /// Compare every chunk the backup did not read, so the report lists every stale
    /// range; then commit the tainted snapshot.
    Scan,
}

impl From<MismatchAction> for blockproof_core::OnMismatch {
    fn from(a: MismatchAction) -> Self {
        match a {
            MismatchAction::Keep => blockproof_core::OnMismatch::Keep,
            MismatchAction::Heal => blockproof_core::OnMismatch::Heal,
            MismatchAction::Scan => blockproof_core::OnMismatch::Scan,
        }
    }
}

/// `forget --per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scope {
    /// Each disk of each vm: the last restore point of any disk stays.
    Disk,
    /// Each vm as a whole.
    Vm,
}

impl From<Scope> for blockproof_core::RetentionScope {
    fn from(s: Scope) -> Self {
        match s {
            Scope::Disk => blockproof_core::RetentionScope::Disk,
            Scope::Vm => blockproof_core::RetentionScope::Vm,
        }
    }
}

/// `--older-than`: a duration such as `30d` or `12h`, or `0`.
fn parse_age(s: &str) -> Result<std::time::Duration, String> {
    if s.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?} ({e}): use e.g. 30d, 12h or 0"))
}

/// `--keep-view`: a duration such as `30m` or `2h`, or `0`.
fn parse_keep(s: &str) -> Result<std::time::Duration, String> {
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration such as 30m, 2h or 0 ({e})"))
}

/// A duration such as `7d`, `12h` or `2w` (not zero).
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err(format!("{s:?} is zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{s:?} is not a duration such as 7d, 12h or 2w ({e})")),
    }
}

/// `restore --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetFormat {
    /// A sparse raw image, or the bytes of a block device.
    Raw,
    /// A qcow2 image (written through qemu-img).
    Qcow2,
}

impl TargetFormat {
    /// The format asked for, or the one the target's name implies (`.qcow2`: qcow2).
    pub fn for_target(asked: Option<TargetFormat>, to: &std::path::Path) -> TargetFormat {
        asked.unwrap_or_else(|| {
            let qcow2 = to.extension().is_some_and(|e| e.eq_ignore_ascii_case("qcow2"));
            if qcow2 {
                TargetFormat::Qcow2
            } else {
                TargetFormat::Raw
            }
        })
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The job file (TOML; schema in docs/JOBS.md).
    #[arg(value_name = "JOBFILE")]
    pub job: PathBuf,
    /// Check the job file and print the plan; open nothing, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the run report (JSON) instead of the summary table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Args, Debug)]
pub struct ScheduleArgs {
    /// The job file; its [schedule] says when.
    #[arg(value_name = "JOBFILE")]
    pub job: PathBuf,
    /// Write UNIT.service and UNIT.timer into this directory (e.g. /etc/systemd/system)
    /// instead of printing them.
    #[arg(long, value_name = "DIR")]
    pub write: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::Cli;

    /// Every subcommand's `--help` ends with an example, and the example parses.
    #[test]
    fn every_subcommand_has_an_example_that_parses() {
        fn visit(cmd: &clap::Command, path: &mut Vec<String>, problems: &mut Vec<String>) {
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                path.push(sub.get_name().to_string());
                if sub.has_subcommands() {
                    visit(sub, path, problems);
                } else {
                    let help = sub.get_after_help().map(|h| h.to_string()).unwrap_or_default();
                    let examples = help.strip_prefix("Example:\n").or_else(|| help.strip_prefix("Examples:\n"));
                    let lines: Vec<&str> =
                        examples.map(|e| e.lines().filter_map(|l| l.strip_prefix("  ")).collect()).unwrap_or_default();
                    if lines.is_empty() {
                        problems.push(format!("{}: no example", path.join(" ")));
                    }
                    for example in lines {
                        // Environment assignments before the command are the shell's.
                        let words: Vec<&str> = example
                            .split_whitespace()
                            .skip_while(|w| w.contains('=') && !w.starts_with('-'))
                            // A redirection after the command is the shell's too.
                            .take_while(|w| !matches!(*w, ">" | "|"))
                            .collect();
                        if words.get(1..=path.len()).map(|w| w.to_vec())
                            != Some(path.iter().map(String::as_str).collect())
                        {
                            problems.push(format!("{}: the example runs another command: {example}", path.join(" ")));
                        } else if let Err(e) = Cli::try_parse_from(&words) {
                            problems.push(format!("{}: the example does not parse: {e}", path.join(" ")));
                        }
                    }
                }
                path.pop();
            }
        }
        let mut problems = Vec::new();
        visit(&Cli::command(), &mut Vec::new(), &mut problems);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
