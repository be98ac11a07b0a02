//! The command-line contract of DESIGN.md §5 beyond the presence of fields
//! (backup_restore.rs): the types and values of the JSON fields, how snapshot references
//! resolve, and quiet stderr when it is not a terminal.

mod harness;

use std::fs;

use harness::{hash, mixed_image, Dir};
use serde_json::Value;

fn u64_field(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("{field} is not a non-negative integer in {v}"))
}

fn is_snapshot_id(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Seconds since the epoch of an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`);
/// `None` if it is not one.
fn rfc3339_seconds(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let o = num(s.len() - 5..s.len() - 3)? * 3600 + num(s.len() - 2..s.len())? * 60;
            if rest.starts_with('-') {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset)
}

#[test]
fn rfc3339_parser_accepts_and_rejects() {
    assert_eq!(rfc3339_seconds("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(rfc3339_seconds("2000-03-01T00:00:00.123456Z"), Some(951868800));
    assert_eq!(rfc3339_seconds("2000-03-01T01:00:00+01:00"), Some(951868800));
    for bad in ["2000-03-01 00:00:00Z", "2000-03-01T00:00:00", "2000-13-01T00:00:00Z", "2000-03-01T00:00:00.Z", "now"] {
        assert_eq!(rfc3339_seconds(bad), None, "{bad}");
    }
}

#[test]
fn json_values_have_the_contract_types() {
    let dir = Dir::new();
    dir.init();
    assert_eq!(dir.repo_cmd("snapshots").arg("--json").json(), serde_json::json!([]), "an empty repository");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    fs::write(&a, mixed_image(5 << 20, 81)).unwrap();
    fs::write(&b, mixed_image((2 << 20) + 777, 82)).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;

    let mut reports = Vec::new();
    for _ in 0..2 {
        let r = dir.backup("web-01", &[("sda", &a), ("sdb", &b)]);
        assert!(is_snapshot_id(&r["snapshot"]), "{r}");
        assert_eq!(r["vm"], "web-01");
        assert!(matches!(r["status"].as_str(), Some("ok" | "tainted")), "{r}");
        let disks = r["disks"].as_array().unwrap();
        assert_eq!(disks.iter().map(|d| d["id"].as_str().unwrap()).collect::<Vec<_>>(), ["sda", "sdb"]);
        for (d, img) in disks.iter().zip([&a, &b]) {
            assert!(matches!(d["mode"].as_str(), Some("full" | "incremental")), "{d}");
            assert!(matches!(d["next_mode"].as_str(), Some("full" | "incremental")), "{d}");
            assert_eq!(u64_field(d, "size"), fs::metadata(img).unwrap().len());
            let chunk = u64_field(d, "chunk_size");
            assert!(chunk.is_power_of_two(), "{d}");
            for f in
                ["bytes_read", "cbt_reported_chunks", "cbt_overreported_chunks", "verified_chunks", "verified_bytes"]
            {
                u64_field(d, f);
            }
            // bytes_read counts reads that back the disk up: all of it, without CBT.
            assert_eq!(u64_field(d, "bytes_read"), u64_field(d, "size"), "{d}");
            for m in d["mismatches"].as_array().unwrap_or_else(|| panic!("mismatches is an array: {d}")) {
                let (offset, length) = (u64_field(m, "offset"), u64_field(m, "length"));
                assert!(length > 0 && offset + length <= u64_field(d, "size"), "{m}");
            }
            let suspects = d["suspect_snapshots"].as_array().unwrap_or_else(|| panic!("suspect_snapshots: {d}"));
            assert!(suspects.iter().all(is_snapshot_id), "{d}");
            let c = &d["coverage"];
            let chunks = u64_field(c, "chunks");
            assert_eq!(chunks, u64_field(d, "size").div_ceil(chunk), "coverage.chunks is the disk's chunk count");
            assert!(u64_field(c, "never_confirmed") <= chunks, "{c}");
            u64_field(c, "oldest_confirmed_runs_ago");
            assert!(u64_field(c, "full_coverage_within_runs") >= 1, "{c}");
        }
        reports.push(r);
    }

    let snaps = dir.repo_cmd("snapshots").arg("--json").json();
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    let mut last_time = i64::MIN;
    for (s, r) in snaps.iter().zip(&reports) {
        assert_eq!(s["id"], r["snapshot"], "oldest first");
        assert_eq!(s["vm"], "web-01");
        assert_eq!(s["status"], r["status"]);
        let time = s["time"].as_str().unwrap();
        let t = rfc3339_seconds(time).unwrap_or_else(|| panic!("time is not RFC 3339: {time}"));
        assert!((t - now).abs() < 3600, "time {time} is not about now");
        assert!(t >= last_time, "{time}");
        last_time = t;
        let disks = s["disks"].as_array().unwrap();
        assert_eq!(disks.len(), 2);
        for (d, rd) in disks.iter().zip(r["disks"].as_array().unwrap()) {
            assert_eq!(d["id"], rd["id"]);
            assert_eq!(d["size"], rd["size"]);
        }
    }
    for d in snaps[1]["disks"].as_array().unwrap() {
        assert_eq!(d["parent"], snaps[0]["id"], "{d}");
    }

    let check = dir.repo_cmd("check").arg("--json").json();
    assert_eq!(check["ok"], Value::Bool(true), "{check}");
    // ok is false exactly when check fails: damage a snapshot file.
    let snap_file = harness::files(&dir.repo().join("snapshots")).remove(0);
    let mut bytes = fs::read(&snap_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&snap_file, bytes).unwrap();
    let out = dir.repo_cmd("check").arg("--json").output();
    assert_eq!(out.status.code(), Some(1));
    let check: Value = serde_json::from_slice(&out.stdout).expect("check --json prints JSON when it fails");
    assert_eq!(check["ok"], Value::Bool(false), "{check}");
}

#[test]
fn snapshot_references_resolve_or_fail_as_usage_errors() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    let mut ids = Vec::new();
    let mut hashes = Vec::new();
    // 17 snapshots: by pigeonhole, two share a first hex digit.
    for i in 0..17u8 {
        let mut data = vec![0u8; 128 << 10];
        data[..64].fill(i + 1);
        data[100_000] = i;
        fs::write(&img, &data).unwrap();
        let vm = if i % 2 == 0 { "even" } else { "odd" };
        ids.push(dir.backup(vm, &[("d", &img)])["snapshot"].as_str().unwrap().to_string());
        hashes.push(blake3::hash(&data));
    }
    let restore = |reference: &str, name: &str| {
        dir.repo_cmd("restore").arg(reference).args(["--disk", "d", "--to", name]).output()
    };

    // VM:latest is the newest snapshot of that vm.
    assert_eq!(hash(&dir.restore("even:latest", "d", "even.img")), hashes[16]);
    assert_eq!(hash(&dir.restore("odd:latest", "d", "odd.img")), hashes[15]);
    // VM:latest~N counts back among the vm's snapshots; VM:tag=TAG and VM:before=TIME.
    assert_eq!(hash(&dir.restore("even:latest~1", "d", "even1.img")), hashes[14]);
    assert_eq!(hash(&dir.restore("odd:latest~7", "d", "odd7.img")), hashes[1]);
    let times: Vec<String> = dir.snapshots().iter().map(|s| s["time"].as_str().unwrap().to_string()).collect();
    let before = format!("even:before={}", times[5]);
    assert_eq!(hash(&dir.restore(&before, "d", "before.img")), hashes[4]);
    // A full id, and the shortest prefix that is unique, in upper case too.
    for (i, id) in ids.iter().enumerate().step_by(5) {
        assert_eq!(hash(&dir.restore(id, "d", &format!("full-{i}.img"))), hashes[i]);
        let unique = (1..=64).map(|n| &id[..n]).find(|p| ids.iter().filter(|o| o.starts_with(p)).count() == 1).unwrap();
        let upper = unique.to_ascii_uppercase();
        assert_eq!(hash(&dir.restore(&upper, "d", &format!("prefix-{i}.img"))), hashes[i], "prefix {upper}");
    }
    // An ambiguous prefix, a prefix of no snapshot, a non-hex reference, an unknown vm.
    let ambiguous = (0..16)
        .map(|d| format!("{d:x}"))
        .find(|p| ids.iter().filter(|id| id.starts_with(p.as_str())).count() >= 2)
        .unwrap();
    let unused =
        (0..=0xfff).map(|d| format!("{d:03x}")).find(|p| !ids.iter().any(|id| id.starts_with(p.as_str()))).unwrap();
    for (reference, expect) in [
        (ambiguous.as_str(), "ambiguous"),
        (unused.as_str(), &unused),
        ("not-an-id", "not-an-id"),
        ("nope:latest", "nope"),
        ("even:latest~9", "latest~9"),
        ("even:latest~x", "latest~x"),
        ("even:tag=none-has-it", "tag=none-has-it"),
        ("even:soonest", "soonest"),
    ] {
        let out = restore(reference, "x.img");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{reference}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{reference}: {stderr}");
        assert!(stderr.contains(expect), "{reference}: the error says {expect:?}: {stderr}");
        assert!(!dir.join("x.img").exists());
    }
}

/// Progress goes to a terminal only: with stderr redirected, successful commands write
/// nothing there (cron mails and CI logs stay clean), and stdout carries the result.
#[test]
fn successful_commands_are_silent_on_stderr_when_it_is_not_a_terminal() {
    let dir = Dir::new();
    let quiet = |cmd: &mut harness::TestCommand, what: &str| {
        let out = cmd.output();
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stderr.is_empty(), "{what} wrote to stderr: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!out.stdout.is_empty(), "{what} printed nothing on stdout");
    };
    quiet(dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1"]), "init");
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(8 << 20, 83)).unwrap();
    let spec = format!("id=d,source={}", img.display());
    quiet(dir.repo_cmd("backup").args(["--vm", "v", "--disk", &spec]), "backup");
    quiet(dir.repo_cmd("backup").args(["--vm", "v", "--json", "--disk", &spec]), "backup --json");
    quiet(&mut dir.repo_cmd("snapshots"), "snapshots");
    quiet(dir.repo_cmd("restore").args(["v:latest", "--disk", "d", "--to", "out.img"]), "restore");
    quiet(dir.repo_cmd("check").arg("--read-data"), "check --read-data");
    assert_eq!(hash(&dir.join("out.img")), hash(&img));
}
