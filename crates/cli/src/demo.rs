//! `blockproof demo`: a self-contained tour on a generated disk, narrated step by step.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use std::process::Command;

use blockproof_core::{BackupOptions, Budget, CheckOptions, DiskInput, NoProgress, OnMismatch, RestoreOptions};
use blockproof_format::KdfParams;
use blockproof_repo::{InitOptions, Repository};
use blockproof_source::Cbt;
use blockproof_store::LocalBackend;
use rand::{Rng, RngCore, SeedableRng};

use crate::args::DemoArgs;
use crate::commands::human_bytes;
use crate::exit;

const DISK_SIZE: u64 = 96 << 20;
const WRITE_SIZE: u64 = 64 << 10;
const PASSWORD: &[u8] = b"demo password";
const DISK_ID: &str = "scsi0-6000c29d";

fn step(n: u32, text: &str) {
    println!("\n{n}. {text}");
}

fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(path).with_context(|| format!("open {}", path.display()))?)?;
    Ok(h.finalize())
}

/// A disk that looks like a small VM's: a partition table, text files, binary data,
/// a copied file and large empty regions.
fn make_disk(path: &Path, rng: &mut rand::rngs::StdRng) -> Result<()> {
    let f = File::create(path)?;
    f.set_len(DISK_SIZE)?;
    let mut mbr = vec![0u8; 512];
    mbr[446..462].copy_from_slice(&[0x80, 0, 0, 0, 0x83, 0, 0, 0, 0, 8, 0, 0, 0, 0xf8, 2, 0]);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    f.write_all_at(&mbr, 0)?;
    let words = ["kernel", "backup", "restore", "snapshot", "block", "tracking", "changed", "verify", "disk"];
    let mut text = String::new();
    while text.len() < 24 << 20 {
        text.push_str(words[rng.gen_range(0..words.len())]);
        text.push(if rng.gen_ratio(1, 12) { '\n' } else { ' ' });
    }
    f.write_all_at(text.as_bytes(), 1 << 20)?;
    let mut binary = vec![0u8; 24 << 20];
    rng.fill_bytes(&mut binary);
    f.write_all_at(&binary, 32 << 20)?;
    // The same "file" twice: stored once.
    f.write_all_at(&binary[..8 << 20], 64 << 20)?;
    // 80..96 MiB stay empty, as does most of what lies between.
    f.sync_all()?;
    Ok(())
}

/// Runs a qemu tool, failing with its message.
fn qemu(program: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (the demo needs qemu-utils)"))?;
    if !out.status.success() {
        bail!("{program} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The guest writes: `count` scattered 64 KiB blocks of new random data, through qemu-io
/// (so the image's enabled dirty bitmaps record them).
fn guest_writes(image: &Path, dir: &Path, count: u64, rng: &mut rand::rngs::StdRng) -> Result<()> {
    let blocks = DISK_SIZE / WRITE_SIZE;
    let mut args: Vec<std::ffi::OsString> = vec!["-f".into(), "qcow2".into()];
    let mut buf = vec![0u8; WRITE_SIZE as usize];
    for i in 0..count {
        rng.fill_bytes(&mut buf);
        let data = dir.join(format!("write-{i}.bin"));
        fs::write(&data, &buf)?;
        let block = (i * blocks / count + rng.gen_range(0..blocks / count)) % blocks;
        args.push("-c".into());
        args.push(format!("write -s {} {} {WRITE_SIZE}", data.display(), block * WRITE_SIZE).into());
    }
    args.push(image.into());
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    qemu("qemu-io", &refs)?;
    for i in 0..count {
        fs::remove_file(dir.join(format!("write-{i}.bin")))?;
    }
    Ok(())
}

/// BLAKE3 of the image's guest-visible bytes (converted to raw by qemu-img).
fn image_hash(image: &Path, dir: &Path) -> Result<blake3::Hash> {
    let raw = dir.join("image-now.raw");
    qemu("qemu-img", &["convert".as_ref(), "-O".as_ref(), "raw".as_ref(), image.as_os_str(), raw.as_os_str()])?;
    let h = hash_file(&raw)?;
    fs::remove_file(raw)?;
    Ok(h)
}

fn backup_once(
    repo: &Repository,
    image: &Path,
    verify: &str,
    on_mismatch: OnMismatch,
) -> Result<blockproof_core::BackupReport> {
    let spec = blockproof_source::DiskSpec::new(&image.display().to_string(), Cbt::AutoBitmap)?;
    let opts = BackupOptions {
        vm: "demo-vm".into(),
        disks: vec![DiskInput::spec(DISK_ID, spec)],
        tags: vec!["demo".into()],
        hostname: blockproof_core::hostname(),
        full: false,
        verify: Budget::parse(verify).map_err(anyhow::Error::msg)?,
        on_mismatch,
        lock_wait: std::time::Duration::ZERO,
        machine: None,
    };
    Ok(blockproof_core::backup(repo, opts, &NoProgress)?)
}

fn repo_size(root: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => walk(&e.path()),
                        _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(root)
}

fn restore_and_compare(repo: &Repository, snap: &str, dir: &Path, name: &str, expected: blake3::Hash) -> Result<()> {
    let target = dir.join(name);
    let opts = RestoreOptions {
        snapshot: snap.into(),
        disk: DISK_ID.into(),
        target: target.clone(),
        force: true,
        ..Default::default()
    };
    let t = Instant::now();
    let r = blockproof_core::restore(repo, &opts, &NoProgress)?;
    let got = hash_file(&target)?;
    let same = got == expected;
    println!(
        "   restored snapshot {} to {} in {:.2} s ({} written, {} empty chunks left as holes)",
        r.snapshot.short(),
        name,
        t.elapsed().as_secs_f64(),
        human_bytes(r.bytes_written),
        r.zero_chunks
    );
    println!("   BLAKE3 {} source at backup time", &expected.to_hex()[..16]);
    println!("   BLAKE3 {} restored  -> {}", &got.to_hex()[..16], if same { "bit-exact" } else { "DIFFERENT" });
    if !same {
        bail!("restored disk differs from its source");
    }
    Ok(())
}

pub fn run(a: DemoArgs) -> Result<u8> {
    let started = Instant::now();
    let (_tmp, dir): (Option<tempfile::TempDir>, PathBuf) = match a.dir.clone() {
        Some(d) => {
            fs::create_dir_all(&d)?;
            if fs::read_dir(&d)?.next().is_some() {
                bail!("{} is not empty; give the demo an empty or new directory", d.display());
            }
            (None, d)
        }
        None => {
            let t = tempfile::Builder::new().prefix("blockproof-demo-").tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let raw = dir.join("vm-disk.raw");
    let disk = dir.join("vm-disk.qcow2");
    let repo_dir = dir.join("repository");
    println!("blockproof demo: working in {}", dir.display());

    step(1, "Making a virtual disk (qcow2): partition table, text files, binary data, a duplicate file, empty space");
    make_disk(&raw, &mut rng)?;
    qemu("qemu-img", &["convert".as_ref(), "-O".as_ref(), "qcow2".as_ref(), raw.as_os_str(), disk.as_os_str()])?;
    fs::remove_file(&raw)?;
    let v1 = image_hash(&disk, &dir)?;
    println!("   {} ({})", disk.display(), human_bytes(DISK_SIZE));

    step(2, "Creating an encrypted repository (Argon2id key slot, XChaCha20-Poly1305, keyed BLAKE3 chunk ids)");
    let opts = InitOptions { kdf: KdfParams::DEFAULT, ..InitOptions::default() };
    let repo = Repository::init(Box::new(LocalBackend::create(&repo_dir)?), PASSWORD, &opts)?;
    println!("   repository {} with {} chunks", repo.id().short(), human_bytes(u64::from(repo.config().chunk_size)));

    step(3, "First backup, cbt=bitmap:auto: blockproof adds a dirty bitmap to the image and reads it all over NBD");
    let r1 = backup_once(&repo, &disk, "25%", OnMismatch::Keep)?;
    let d = &r1.disks[0];
    println!(
        "   snapshot {}: read {} through a private read-only qemu-nbd ({} unallocated chunks not even read),",
        r1.snapshot.short(),
        human_bytes(d.bytes_read),
        d.zero_chunks,
    );
    println!(
        "   {} of new data stored as {} (compressed, deduplicated, encrypted)",
        human_bytes(d.new_bytes),
        human_bytes(d.stored_bytes)
    );
    let size_after_first = repo_size(&repo_dir);

    step(4, "The guest writes (qemu-io): 1% of the disk changes in scattered 64 KiB blocks; the bitmap records them");
    let changed = (DISK_SIZE / WRITE_SIZE) / 100;
    guest_writes(&disk, &dir, changed, &mut rng)?;
    let v2 = image_hash(&disk, &dir)?;
    println!("   {} blocks rewritten ({})", changed, human_bytes(changed * WRITE_SIZE));

    step(5, "Incremental backup: reads only what the bitmap reports, then verifies a 25% sample of the rest");
    let r2 = backup_once(&repo, &disk, "25%", OnMismatch::Keep)?;
    let d = &r2.disks[0];
    let growth = repo_size(&repo_dir) - size_after_first;
    println!(
        "   snapshot {}: read {} ({} chunks reported), repository grew by {} for {} changed ({:.2}x);",
        r2.snapshot.short(),
        human_bytes(d.bytes_read),
        d.cbt_reported_chunks,
        human_bytes(growth),
        human_bytes(changed * WRITE_SIZE),
        growth as f64 / (changed * WRITE_SIZE) as f64
    );
    println!(
        "   compared {} unchanged chunks with the source: all equal; every chunk is confirmed within {} runs",
        d.verified_chunks, d.coverage.full_coverage_within_runs
    );

    step(6, "Restoring both restore points and comparing them with the disk as it was");
    restore_and_compare(&repo, &r1.snapshot.to_hex(), &dir, "restore-1.raw", v1)?;
    restore_and_compare(&repo, &r2.snapshot.to_hex(), &dir, "restore-2.raw", v2)?;

    step(7, "Change tracking lies: a write made while the bitmap is disabled (qemu-img bitmap --disable, qemu-io, --enable)");
    let bitmap = blockproof_source::image_bitmaps(&disk)?
        .into_iter()
        .map(|b| b.name)
        .find(|n| n.starts_with("blockproof/"))
        .context("no blockproof bitmap in the image")?;
    let lie_at = 40 * WRITE_SIZE + 8192;
    qemu("qemu-img", &["bitmap".as_ref(), "--disable".as_ref(), disk.as_os_str(), bitmap.as_ref()])?;
    let pattern = format!("write -P 0x42 {lie_at} 4096");
    qemu("qemu-io", &["-f".as_ref(), "qcow2".as_ref(), "-c".as_ref(), pattern.as_ref(), disk.as_os_str()])?;
    qemu("qemu-img", &["bitmap".as_ref(), "--enable".as_ref(), disk.as_os_str(), bitmap.as_ref()])?;
    let v3 = image_hash(&disk, &dir)?;
    println!("   4 KiB written at byte {lie_at}; bitmap {bitmap} never saw it: every incremental would now inherit stale data");

    step(8, "Incrementals with --verify 25% --on-mismatch=heal until the sample reaches the stale chunk");
    let mut caught = None;
    for run in 1..=8 {
        let r = backup_once(&repo, &disk, "25%", OnMismatch::Heal)?;
        let d = &r.disks[0];
        println!(
            "   run {run}: snapshot {} read {}, compared {} unchanged chunks: {}",
            r.snapshot.short(),
            human_bytes(d.bytes_read),
            d.verified_chunks,
            if d.mismatches.is_empty() { "all equal".to_string() } else { "MISMATCH".to_string() }
        );
        if !d.mismatches.is_empty() {
            caught = Some((run, r));
            break;
        }
    }
    let (run, r) = caught.context("the lie was not caught within 8 runs")?;
    let d = &r.disks[0];
    let bound = d.coverage.full_coverage_within_runs;
    for m in &d.mismatches {
        println!(
            "   differs from the source: bytes {} ({} bytes, exact to the sector)",
            crate::commands::range_text(m.offset, m.length),
            m.length
        );
    }
    println!(
        "   caught in run {run} (the bound is {bound} runs); snapshot {} kept as {}, exit code 3 from the CLI",
        r.snapshot.short(),
        r.status.as_str()
    );
    if !d.suspect_snapshots.is_empty() {
        let s: Vec<String> = d.suspect_snapshots.iter().map(|s| s.short()).collect();
        println!("   earlier restore points that may hold the same stale data: {}", s.join(", "));
    }
    println!("   {}", d.advice.as_deref().unwrap_or(""));
    let healed = r.healed_snapshot.context("no healed snapshot")?;
    println!(
        "   healed: snapshot {healed} re-read the disk in full from the same source snapshot",
        healed = healed.short()
    );
    if run > bound {
        bail!("caught after the bound");
    }
    restore_and_compare(&repo, &healed.to_hex(), &dir, "restore-healed.raw", v3)?;

    step(9, "Checking the repository: every stored blob is decrypted and re-hashed against its id");
    let check = blockproof_core::check(&repo, &CheckOptions { read_data: Some(Default::default()) }, &NoProgress)?;
    let rd = check.read_data.clone().unwrap_or_default();
    println!(
        "   {} snapshots, {} packs, {} blobs verified: {}",
        check.snapshots,
        rd.packs_checked,
        rd.blobs_checked,
        if check.ok { "no errors" } else { "ERRORS" }
    );
    if !check.ok {
        bail!("check found errors: {}", check.errors.join("; "));
    }

    step(10, "Damaging one byte of the repository, as a failing disk or an attacker would");
    let pack = largest_pack(&repo_dir)?;
    let f = OpenOptions::new().read(true).write(true).open(&pack)?;
    let len = f.metadata()?.len();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, len / 2)?;
    f.write_all_at(&[byte[0] ^ 0x20], len / 2)?;
    let check = blockproof_core::check(&repo, &CheckOptions { read_data: Some(Default::default()) }, &NoProgress)?;
    println!("   check --read-data finds {} error(s):", check.errors.len());
    for e in &check.errors {
        println!("     {e}");
    }
    // The largest pack holds the first backup's data: a restore must fail.
    let mut refused = 0;
    for (snap, name) in [(&r1.snapshot, "restore-1-damaged.raw"), (&r2.snapshot, "restore-2-damaged.raw")] {
        let bad = RestoreOptions {
            snapshot: snap.to_hex(),
            disk: DISK_ID.into(),
            target: dir.join(name),
            force: true,
            ..Default::default()
        };
        match blockproof_core::restore(&repo, &bad, &NoProgress) {
            Ok(_) => println!("   restore of snapshot {} does not use the damaged chunk: it succeeds", snap.short()),
            Err(e) => {
                refused += 1;
                if dir.join(name).exists() {
                    bail!("a failed restore left {name} behind");
                }
                println!("   restore of snapshot {} refuses, writes no file, and names the range:", snap.short());
                println!("     {e}");
            }
        }
    }
    if check.ok || refused == 0 {
        bail!("the damage went unnoticed");
    }
    f.write_all_at(&byte, len / 2)?;

    println!("\nProved in {:.1} s:", started.elapsed().as_secs_f64());
    println!("  - restore points restore bit-exact (BLAKE3 of the whole disk against qemu-img's view of it);");
    println!("  - an incremental read only what the dirty bitmap reported and stored about the changed bytes;");
    println!("  - a write the bitmap never saw was caught by sampling within the reported bound, with its");
    println!("    exact bytes, the restore point marked tainted, and a healed restore point that is bit-exact;");
    println!("  - every stored blob authenticates and matches its id; one flipped byte is caught,");
    println!("    and restore fails loudly instead of returning wrong bytes.");
    if a.dir.is_none() {
        println!("(the demo's temporary directory is removed; use --dir DIR to keep it)");
    }
    Ok(exit::OK)
}

/// The largest pack: a full one, written by the first backup, holding chunks every
/// restore point uses.
fn largest_pack(repo: &Path) -> Result<PathBuf> {
    let packs = fs::read_dir(repo.join("data"))?
        .filter_map(|e| e.ok())
        .flat_map(|d| fs::read_dir(d.path()).into_iter().flatten().filter_map(|e| e.ok()).map(|e| e.path()));
    packs
        .max_by_key(|p| (fs::metadata(p).map(|m| m.len()).unwrap_or(0), p.clone()))
        .context("the repository has no pack file")
}
