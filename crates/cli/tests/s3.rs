//! Repositories on S3, against a real Garage node on loopback (harness/garage.rs): the
//! cycle of the local-directory tests (backup, CBT incremental, a CBT lie caught by
//! verification, restore, check, forget, gc, copy both ways), large objects by multipart
//! upload, three backup processes into one bucket at once followed by gc, the server
//! killed in the middle of a backup, and the backend contract (blockproof_store::contract)
//! against `S3Backend` itself; copy and serve-nbd reading by pack regions as a restore
//! does (their GETs counted).

mod harness;

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use harness::garage::Garage;
use harness::qemu::{assert_restores, backup, CHUNK};
use harness::{change_list, hash, scatter_writes, snap_id, Dir};
use serde_json::Value;

fn init(dir: &Dir, extra: &[&str]) {
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1"]).args(extra).ok();
}

/// The request counters a command printed with `BLOCKPROOF_S3_STATS=1`.
fn requests(stderr: &str) -> Value {
    let line = stderr.lines().find_map(|l| l.strip_prefix("blockproof: s3 requests: ")).expect("request counts");
    serde_json::from_str(line).unwrap()
}

/// The GETs of a command that ran with `BLOCKPROOF_S3_STATS=1` and succeeded.
fn gets(out: std::process::Output) -> u64 {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    requests(&stderr)["get"].as_u64().unwrap()
}

/// A repository with `--pack-size 4MiB` on `garage`'s bucket `bucket`, holding one backup
/// of a 32 MiB mixed image; returns the directory, the image and the snapshot id, and the
/// GETs of a restore of it without the local cache.
fn regions_fixture(garage: &Garage, bucket: &str) -> (Dir, PathBuf, String, u64) {
    let dir = Dir::on_s3(garage, &format!("s3://{bucket}/repo"));
    init(&dir, &["--pack-size", "4MiB"]);
    let img = dir.image("d.img", 32 << 20, 9);
    let snap = snap_id(&backup(&dir, "vm", &[format!("id=d,source={}", img.display())]));
    let to = dir.join("restored.raw");
    let restore = gets(
        dir.repo_cmd("restore")
            .arg(&snap)
            .args(["--disk", "d", "--no-cache", "--to"])
            .arg(&to)
            .env("BLOCKPROOF_S3_STATS", "1")
            .output(),
    );
    assert_eq!(hash(&to), hash(&img));
    fs::remove_file(&to).unwrap();
    (dir, img, snap, restore)
}

/// The whole cycle on s3://: init, full backup, incremental with a change list, a lying
/// change list caught by verification and healed, restore, check, forget, gc, and copy
/// from S3 to a directory and back.
#[test]
fn full_cycle_on_s3() {
    let Some(garage) = Garage::start(&["cycle"]) else { return };
    let dir = Dir::on_s3(&garage, "s3://cycle/site-a/vms");
    init(&dir, &[]);
    // A second init on the same prefix is refused; a missing repository is named.
    let line = dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1"]).fails_with_one_line(1);
    assert!(line.contains("s3://cycle/site-a/vms") && line.contains("already holds objects"), "{line}");
    let line = dir.cmd("snapshots").args(["--repo", "s3://cycle/elsewhere"]).fails_with_one_line(1);
    assert!(line.contains("not a blockproof repository"), "{line}");

    let size = 12 << 20;
    let img = dir.image("d.img", size, 1);
    let list = dir.join("changes.json");
    let spec = format!("id=d,source={},cbt=changes:{}", img.display(), list.display());
    change_list(&list, size, &[]);
    let full = backup(&dir, "vm", std::slice::from_ref(&spec));
    assert_eq!(full["disks"][0]["mode"], "full", "{full}");

    // An honest incremental: only the listed chunks are read.
    let mut data = fs::read(&img).unwrap();
    let areas = [(CHUNK * 7, CHUNK), (CHUNK * 100 + 4096, 8192)];
    for (i, &(off, len)) in areas.iter().enumerate() {
        data[off as usize..(off + len) as usize].fill(0x41 + i as u8);
    }
    fs::write(&img, &data).unwrap();
    change_list(&list, size, &areas);
    let inc = backup(&dir, "vm", std::slice::from_ref(&spec));
    assert_eq!(inc["disks"][0]["mode"], "incremental", "{inc}");
    assert_eq!(inc["disks"][0]["bytes_read"], 2 * CHUNK, "{inc}");
    assert_restores(&dir, &inc["snapshot"], "d", &img);
    // Restore fetches pack regions, not one GET per chunk (192 chunks here).
    let out = dir.join("counted.img");
    let run = dir
        .repo_cmd("restore")
        .arg(snap_id(&inc))
        .args(["--disk", "d", "--to"])
        .arg(&out)
        .env("BLOCKPROOF_S3_STATS", "1")
        .output();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let gets = requests(&String::from_utf8_lossy(&run.stderr))["get"].as_u64().unwrap();
    assert!(gets <= 24, "{gets} GETs for 192 chunks");
    assert_eq!(hash(&out), hash(&img));
    fs::remove_file(&out).unwrap();

    // A lie: a write the change list leaves out is caught by full verification.
    let hidden = (CHUNK * 150, CHUNK);
    data[hidden.0 as usize..(hidden.0 + hidden.1) as usize].fill(0x5a);
    fs::write(&img, &data).unwrap();
    change_list(&list, size, &[]);
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", "vm", "--json", "--verify", "100%", "--on-mismatch=heal", "--disk", &spec]);
    let (stdout, _) = c.code(3);
    let lie: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(lie["status"], "tainted");
    assert_eq!(lie["disks"][0]["mismatches"][0]["offset"], hidden.0, "{lie}");
    let healed = &lie["healed_snapshot"];
    assert_restores(&dir, healed, "d", &img);
    dir.check_all();

    // Forget everything before the healed snapshot; gc frees it; what is left restores.
    dir.repo_cmd("forget").args([snap_id(&full), snap_id(&inc), snap_id(&lie)]).ok();
    let gc = dir.repo_cmd("gc").arg("--json").json();
    assert_eq!(gc["packs_deferred"], 0, "{gc}");
    assert_eq!(dir.snapshots().len(), 1);
    dir.check_all();
    assert_restores(&dir, healed, "d", &img);

    // Copy S3 -> directory -> S3 (another prefix, other keys): bit-exact at each end.
    let local = dir.join("local-repo");
    let on = |sub: &str, repo: &std::ffi::OsStr, pw: &str| {
        let mut c = dir.cmd(sub);
        c.arg("--repo").arg(repo).env("BLOCKPROOF_PASSWORD", pw);
        c
    };
    on("init", local.as_os_str(), "local").args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    let r = dir.repo_cmd("copy").arg("--to").arg(&local).arg("--json").env("BLOCKPROOF_TO_PASSWORD", "local").json();
    assert_eq!(r["copied"].as_array().unwrap().len(), 1, "{r}");
    let target = r["copied"][0]["target"].as_str().unwrap().to_string();
    let out = dir.join("from-local.img");
    on("restore", local.as_os_str(), "local").arg(&target).args(["--disk", "d", "--to"]).arg(&out).ok();
    assert_eq!(hash(&out), hash(&img));
    let site_b = std::ffi::OsString::from("s3://cycle/site-b");
    on("init", &site_b, "b").args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    on("copy", local.as_os_str(), "local").arg("--to").arg(&site_b).env("BLOCKPROOF_TO_PASSWORD", "b").ok();
    let back = on("snapshots", &site_b, "b").arg("--json").json();
    let id = back[0]["id"].as_str().unwrap().to_string();
    fs::remove_file(&out).unwrap();
    on("restore", &site_b, "b").arg(&id).args(["--disk", "d", "--to"]).arg(&out).ok();
    assert_eq!(hash(&out), hash(&img));
    let r = on("check", &site_b, "b").args(["--read-data", "--json"]).json();
    assert_eq!(r["ok"], true, "{r}");
}

/// Objects above the multipart threshold (64 MiB) go up in parts and read back whole;
/// the request counters show it.
#[test]
fn large_packs_are_uploaded_in_parts() {
    let Some(garage) = Garage::start(&["large"]) else { return };
    let dir = Dir::on_s3(&garage, "s3://large/repo");
    init(&dir, &["--pack-size", "1GiB"]);
    // Incompressible, so the single pack holds all 80 MiB.
    let img = dir.random_image("random.img", 80 << 20, 5);
    let out = dir.backup_cmd("big", &[("d", &img)]).env("BLOCKPROOF_S3_STATS", "1").output();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stats = requests(&String::from_utf8_lossy(&out.stderr));
    assert!(stats["multipart_part"].as_u64().unwrap() >= 5, "{stats}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_restores(&dir, &r["snapshot"], "d", &img);
    dir.check_all();
}

/// Three backup processes of different vms into one S3 repository at the same time, twice
/// (a full, then an incremental after scattered writes); then forget and gc; every
/// remaining snapshot restores bit-exact and check --read-data passes.
#[test]
fn three_concurrent_backups_then_gc() {
    let Some(garage) = Garage::start(&["shared"]) else { return };
    let dir = Dir::on_s3(&garage, "s3://shared/cluster");
    init(&dir, &["--pack-size", "2MiB"]);
    let vms = ["web", "db", "mail"];
    let images: Vec<PathBuf> = vms.iter().enumerate().map(|(i, vm)| dir.image(vm, 12 << 20, 20 + i as u64)).collect();
    let mut rounds: Vec<Vec<Value>> = Vec::new();
    for round in 0..2 {
        if round == 1 {
            for (i, img) in images.iter().enumerate() {
                let mut data = fs::read(img).unwrap();
                scatter_writes(&mut data, 16, 65536, 30 + i as u64);
                fs::write(img, &data).unwrap();
            }
        }
        let children: Vec<_> =
            vms.iter().zip(&images).map(|(vm, img)| dir.backup_cmd(vm, &[("d", img)]).spawn_piped()).collect();
        let ids = children
            .into_iter()
            .map(|child| {
                let out = child.wait_with_output().unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                serde_json::from_slice::<Value>(&out.stdout).unwrap()["snapshot"].clone()
            })
            .collect();
        rounds.push(ids);
    }
    dir.repo_cmd("forget").arg(rounds[0][1].as_str().unwrap()).ok();
    let gc = dir.repo_cmd("gc").arg("--json").json();
    assert_eq!(gc["packs_deferred"], 0, "{gc}");
    assert_eq!(dir.snapshots().len(), 5);
    dir.check_all();
    for (i, img) in images.iter().enumerate() {
        assert_restores(&dir, &rounds[1][i], "d", img);
    }
}

/// Garage is SIGKILLed in the middle of a backup: the backup fails with one clear line
/// naming the S3 object; once the node is back, check passes, a re-run completes and
/// restores bit-exact.
#[test]
fn server_killed_during_a_backup() {
    let Some(mut garage) = Garage::start(&["crash"]) else { return };
    let dir = Dir::on_s3(&garage, "s3://crash/repo");
    init(&dir, &["--pack-size", "1MiB"]);
    let img = dir.random_image("d.img", 96 << 20, 7);
    let base = garage.data_bytes();
    let child =
        dir.backup_cmd("v", &[("d", &img)]).args(["--s3-uploads", "1", "--s3-retry-timeout", "3"]).spawn_piped();
    harness::wait_until("the backup's first uploads", || garage.data_bytes() >= base + (2 << 20));
    garage.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap();
    assert!(last.starts_with("blockproof: error: ") && last.contains("s3://crash/repo/"), "{stderr}");
    // While it is down, every command fails the same way, after its retries.
    let line = dir.repo_cmd("snapshots").args(["--s3-retry-timeout", "1"]).fails_with_one_line(1);
    assert!(line.contains("s3://crash/repo"), "{line}");

    garage.restart();
    dir.check_all();
    assert!(dir.snapshots().is_empty(), "no snapshot was committed");
    let r = dir.backup("v", &[("d", &img)]);
    assert_restores(&dir, &r["snapshot"], "d", &img);
    dir.check_all();
}

/// The backend contract every store keeps (blockproof_store::contract), against
/// `S3Backend` on the node: every check on an empty prefix, two handles on one prefix, and
/// the read cache over S3 as the CLI uses it. Run in a child process that has the node's
/// credentials in its environment (harness/garage.rs).
#[test]
fn s3_backend_keeps_the_backend_contract() {
    let Some(garage) = Garage::start(&["contract"]) else { return };
    garage.run_test_in_child("s3_backend_contract_child");
}

#[test]
#[ignore = "run by s3_backend_keeps_the_backend_contract, with a Garage node's credentials"]
fn s3_backend_contract_child() {
    use blockproof_s3::{S3Backend, S3Location, S3Options};
    use blockproof_store::contract::{check_backend, check_shared};

    if std::env::var_os("BLOCKPROOF_TEST_CHILD").is_none() {
        return;
    }
    let options = S3Options {
        endpoints: vec![std::env::var("BLOCKPROOF_S3_ENDPOINT").unwrap()],
        path_style: true,
        retry_timeout: Duration::from_secs(10),
        ..S3Options::default()
    };
    let at = |prefix: &str| S3Backend::create(S3Location::parse(&format!("s3://contract/{prefix}")).unwrap(), &options);
    check_backend(&at("alone").unwrap()).unwrap_or_else(|v| panic!("{v}"));
    // Both handles are made while the prefix is empty (create refuses a used one).
    let (first, second) = (at("shared").unwrap(), at("shared").unwrap());
    check_shared(&first, &second).unwrap_or_else(|v| panic!("{v}"));
    let cache_dir = tempfile::tempdir().unwrap();
    let cached = blockproof_store::ReadCache::new(Box::new(at("cached").unwrap()), cache_dir.path()).unwrap();
    check_backend(&cached).unwrap_or_else(|v| panic!("{v}"));
}

/// A multipart upload left incomplete (its process killed): no listing shows it, gc's
/// `clean_temporary` lists it (ListMultipartUploads) and aborts it once it is older than
/// the age given, and leaves a younger one alone. Run in a child process with the node's
/// credentials.
#[test]
fn stale_multipart_uploads_are_aborted() {
    let Some(garage) = Garage::start(&["parts"]) else { return };
    garage.run_test_in_child("stale_multipart_uploads_child");
}

#[test]
#[ignore = "run by stale_multipart_uploads_are_aborted, with a Garage node's credentials"]
fn stale_multipart_uploads_child() {
    use blockproof_s3::{multipart, S3Backend, S3Location, S3Options};
    use blockproof_store::{Backend, Kind};
    use object_store::ObjectStoreExt;

    if std::env::var_os("BLOCKPROOF_TEST_CHILD").is_none() {
        return;
    }
    let endpoint = std::env::var("BLOCKPROOF_S3_ENDPOINT").unwrap();
    let options = S3Options { endpoints: vec![endpoint.clone()], path_style: true, ..S3Options::default() };
    let backend = S3Backend::create(S3Location::parse("s3://parts/repo").unwrap(), &options).unwrap();
    // An upload of a pack, started and never completed, as a killed process leaves it.
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name("parts")
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .build()
        .unwrap();
    let key = object_store::path::Path::from(format!("repo/data/ab/ab{}", "0".repeat(62)));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut upload = store.put_multipart(&key).await.unwrap();
        upload.put_part(vec![7u8; 5 << 20].into()).await.unwrap();
        std::mem::forget(upload);
    });
    assert!(backend.list(Kind::Pack).unwrap().is_empty(), "invisible to listings");
    let listed = multipart::list(&backend, "repo/data/").unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].key, key.as_ref());
    // Younger than an hour: kept (it may be a running backup's).
    assert_eq!(backend.clean_temporary(Duration::from_secs(3600)).unwrap(), 0);
    assert_eq!(multipart::list(&backend, "repo/data/").unwrap().len(), 1);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(backend.clean_temporary(Duration::from_secs(1)).unwrap(), 1);
    assert!(multipart::list(&backend, "repo/data/").unwrap().is_empty());
}

/// `copy` out of S3 reads by pack regions as a restore does: its GETs stay within twice
/// the restore's (before issue 22: one GET per chunk, 517 against 14 for 32 MiB).
#[test]
fn copy_reads_pack_regions_like_a_restore() {
    let Some(garage) = Garage::start(&["regions"]) else { return };
    let (dir, _, _, restore) = regions_fixture(&garage, "regions");
    let local = dir.join("local-repo");
    dir.cmd("init")
        .arg("--repo")
        .arg(&local)
        .args(["--kdf-memory", "8", "--kdf-iterations", "1"])
        .env("BLOCKPROOF_PASSWORD", "local")
        .ok();
    let copy = gets(
        dir.repo_cmd("copy")
            .arg("--to")
            .arg(&local)
            .arg("--no-cache")
            .env("BLOCKPROOF_TO_PASSWORD", "local")
            .env("BLOCKPROOF_S3_STATS", "1")
            .output(),
    );
    assert!(copy <= 2 * restore, "copy made {copy} GETs, restore {restore}");
    eprintln!("GETs: restore {restore}, copy {copy}");
}

/// `serve-nbd` on S3 read whole by real NBD clients (qemu-img convert: 2 MiB requests,
/// several in flight; nbdcopy: 256 KiB requests over several connections) costs about
/// the GETs of a restore: each read fetches pack regions and a stream is read ahead. At
/// most twice the restore's (before issue 22: one GET per stored chunk).
#[test]
fn serve_nbd_reads_pack_regions_like_a_restore() {
    let Some(garage) = Garage::start(&["serving"]) else { return };
    let (dir, img, snap, restore) = regions_fixture(&garage, "serving");
    let sock = dir.join("nbd.sock");
    let uri = format!("nbd+unix:///d?socket={}", sock.display());
    let out = dir.join("served.raw");
    let clients: [(&str, Vec<&str>); 2] = [
        ("qemu-img", vec!["convert", "-f", "raw", "-O", "raw", &uri, out.to_str().unwrap()]),
        ("nbdcopy", vec![&uri, out.to_str().unwrap()]),
    ];
    for (client, args) in clients {
        let server = dir
            .repo_cmd("serve-nbd")
            .arg(&snap)
            .args(["--no-cache", "--socket"])
            .arg(&sock)
            .env("BLOCKPROOF_S3_STATS", "1")
            .spawn_piped();
        harness::wait_until("serve-nbd listening", || std::os::unix::net::UnixStream::connect(&sock).is_ok());
        let run = std::process::Command::new(client).args(&args).output().unwrap();
        assert!(run.status.success(), "{client}: {}", String::from_utf8_lossy(&run.stderr));
        assert_eq!(hash(&out), hash(&img), "{client}");
        fs::remove_file(&out).unwrap();
        // SAFETY: a signal to the child this test started and has not yet reaped.
        assert_eq!(unsafe { libc::kill(server.id() as i32, libc::SIGTERM) }, 0);
        let served = gets(server.wait_with_output().unwrap());
        // Stopped cleanly, though the S3 client had started threads before the handler.
        assert!(!sock.exists(), "the socket file was left behind");
        assert!(served <= 2 * restore, "serve-nbd read by {client} made {served} GETs, restore {restore}");
        eprintln!("GETs: restore {restore}, serve-nbd to {client} {served}");
    }
}
