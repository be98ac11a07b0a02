//! Repositories on a 3-node Garage cluster on loopback (harness/garage.rs,
//! `Garage::cluster`: replication factor 3, every node's endpoint in `--s3-endpoint`):
//! a node restarted in the middle of a backup (failover between the endpoints) and of a
//! restore (through that node alone: retries bridge its absence) — both complete; two
//! nodes killed — the backup fails with one readable line, nothing half-visible, and the
//! re-run completes.

mod harness;

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use harness::garage::Garage;
use harness::qemu::assert_restores;
use harness::{wait_until, Dir};
use serde_json::Value;

/// A 3-node cluster with `bucket`, a repository in it, a 48 MiB image (`seed`), and a
/// backup of it (`args` added, request counts printed) that is under way: three copies
/// of 2 MiB of its packs are stored. `None` without Garage.
fn backup_under_way(bucket: &str, seed: u64, args: &[&str]) -> Option<(Garage, Dir, PathBuf, Child)> {
    let garage = Garage::cluster(3, &[bucket])?;
    let dir = Dir::on_s3(&garage, &format!("s3://{bucket}/repo"));
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "1MiB"]).ok();
    let img = dir.random_image("d.img", 48 << 20, seed);
    let base = garage.data_bytes();
    let child = dir.backup_cmd("v", &[("d", &img)]).args(args).env("BLOCKPROOF_S3_STATS", "1").spawn_piped();
    wait_until("the backup's first uploads", || garage.data_bytes() >= base + (6 << 20));
    Some((garage, dir, img, child))
}

/// The request counters a command printed with `BLOCKPROOF_S3_STATS=1`.
fn requests(stderr: &str) -> Value {
    let line = stderr.lines().find_map(|l| l.strip_prefix("blockproof: s3 requests: ")).expect("request counts");
    serde_json::from_str(line).unwrap()
}

/// Bytes a process has written (`wchar` of /proc/PID/io).
fn written(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("wchar: ")).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The first node (the endpoint every request starts at) is SIGKILLed in the middle of a
/// backup and restarted seconds later: the requests fail over to the other nodes and the
/// backup completes. Then the same node is killed in the middle of a restore that reaches
/// the cluster through it alone: the restore retries until it is back and completes
/// bit-exact. Before issue 22 the first failed the request after object_store's 20
/// quick retries (a ~10 s restart failed a backup) and there was no failover.
#[test]
fn a_node_restarted_during_a_backup_and_a_restore() {
    let Some((mut garage, dir, img, child)) = backup_under_way("failover", 3, &["--s3-uploads", "2"]) else { return };
    garage.kill_node(0);
    std::thread::sleep(Duration::from_secs(5));
    garage.restart_node(0);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stats = requests(&stderr);
    assert!(stats["retries"].as_u64().unwrap() > 0, "the backup met the dead node: {stats}");
    let snapshot = serde_json::from_slice::<Value>(&out.stdout).unwrap()["snapshot"].clone();

    // The restore talks to the first node only.
    let to = dir.join("restored.raw");
    let child = dir
        .repo_cmd("restore")
        .arg(snapshot.as_str().unwrap())
        .args(["--disk", "d", "--to"])
        .arg(&to)
        .env("BLOCKPROOF_S3_ENDPOINT", garage.node_endpoint(0))
        .env("BLOCKPROOF_S3_STATS", "1")
        .spawn_piped();
    let pid = child.id();
    wait_until("the restore's first writes", || written(pid) >= 4 << 20);
    garage.kill_node(0);
    std::thread::sleep(Duration::from_secs(5));
    garage.restart_node(0);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stats = requests(&stderr);
    assert!(stats["retries"].as_u64().unwrap() > 0, "the restore met the dead node: {stats}");
    assert_eq!(harness::hash(&to), harness::hash(&img));
    std::fs::remove_file(&to).unwrap();
    dir.check_all();
}

/// Two of the three nodes are SIGKILLed in the middle of a backup: no object can reach
/// its write quorum. The backup fails after its retry timeout with one readable line (the
/// object, the endpoint, Garage's quorum error in words, what was tried, what to do) and
/// stops its other uploads at once; nothing is half-visible, and with the nodes back the
/// re-run completes. Before issue 22 the process hung on to a stalled upload for five
/// minutes and the line quoted raw XML with `&quot;` entities.
#[test]
fn two_nodes_down_fail_a_backup_in_one_line_and_the_rerun_completes() {
    let Some((mut garage, dir, img, child)) = backup_under_way("quorum", 4, &["--s3-retry-timeout", "5"]) else {
        return;
    };
    garage.kill_node(1);
    garage.kill_node(2);
    let killed = Instant::now();
    let out = child.wait_with_output().unwrap();
    eprintln!("the backup exited {:.1} s after the nodes were killed", killed.elapsed().as_secs_f64());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("blockproof: error: ")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let line = errors[0];
    eprintln!("{line}");
    assert!(line.contains("s3://quorum/repo/"), "names the object: {line}");
    // The node that is up answers that it cannot reach a quorum; the others refuse.
    assert!(line.contains(&format!("{} answered 503 Service Unavailable", garage.node_endpoint(0))), "{line}");
    assert!(line.contains("quorum"), "{line}");
    assert!(line.contains("(retry timeout 5 s)") || line.contains("not retried"), "says what was tried: {line}");
    assert!(line.contains("--s3-retry-timeout") || line.contains("--s3-endpoint"), "says what to try: {line}");
    assert!(!line.contains("&quot;") && !line.contains('<'), "no raw XML: {line}");

    garage.restart_node(1);
    garage.restart_node(2);
    assert!(dir.snapshots().is_empty(), "no snapshot was committed");
    dir.check_all();
    let r = dir.backup("v", &[("d", &img)]);
    assert_restores(&dir, &r["snapshot"], "d", &img);
    dir.check_all();
}
