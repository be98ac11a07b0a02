//! Job files: a valid one resolves every policy (vm over group over `[defaults]`); every
//! invalid one is refused before anything runs, with an error naming the file and line.

use std::path::Path;

use blockproof_fleet::job::PasswordSource;
use blockproof_fleet::Job;

const GOOD: &str = r#"version = 1
name = "nightly"

[repository]
location = "/srv/backup"
password_file = "pw"

[copy]
location = "s3://offsite/blockproof"
password_env = "OFFSITE_PASSWORD"

[schedule]
every = "6h"
at = "00:30"

[run]
parallel = 3

[defaults]
verify = "2%"
retention = { keep_daily = 7 }
tags = ["prod"]

[groups.db]
detect_within = "7d"
pre = { command = ["/bin/true"], timeout = "20s" }
tags = ["db"]

[[vm]]
name = "web01"
disks = ["id=sda,source=disks/web01.img"]

[[vm]]
name = "db01"
group = "db"
disks = ["id=sda,source=/dev/vg/db01,verify=10%", "id=sdb,source=nbd+unix:///x?socket=/s"]
retention = { keep_last = 3 }
"#;

fn parse(text: &str) -> Result<Job, blockproof_fleet::JobError> {
    Job::parse(Path::new("/etc/blockproof/nightly.toml"), text)
}

#[test]
fn a_valid_job_resolves_every_policy() {
    let job = parse(GOOD).unwrap();
    assert_eq!((job.name.as_str(), job.parallel, job.vms.len()), ("nightly", 3, 2));
    assert_eq!(job.repository.password, PasswordSource::File("/etc/blockproof/pw".into()));
    assert_eq!(job.copy.as_ref().unwrap().password, PasswordSource::Env("OFFSITE_PASSWORD".into()));
    let web = &job.vms[0];
    assert_eq!(web.disks[0].source, "/etc/blockproof/disks/web01.img", "relative to the job file");
    assert_eq!(web.verify.text, "2%");
    assert!(web.verify.objective.is_none() && web.pre.is_none());
    assert_eq!(web.retention.as_ref().unwrap().daily, Some(7));
    assert_eq!(web.tags, ["prod"]);
    let db = &job.vms[1];
    // The group's objective over the defaults' budget: 7 days at 4 runs a day = 28 runs.
    let o = db.verify.objective.as_ref().expect("objective");
    assert_eq!((o.runs, db.verify.text.as_str()), (28, "3.6%"));
    assert_eq!(db.pre.as_ref().unwrap().timeout.as_secs(), 20);
    assert_eq!(db.retention.as_ref().unwrap().last, Some(3));
    assert_eq!(db.retention.as_ref().unwrap().daily, None, "the vm's retention replaces the defaults'");
    assert_eq!(db.tags, ["prod", "db"]);
    assert_eq!(db.disks[1].source, "nbd+unix:///x?socket=/s");
}

/// `GOOD` with `from` replaced by `to`, expected to fail at `line` with `message` in it.
fn refused(from: &str, to: &str, line: usize, message: &str) {
    assert!(GOOD.contains(from), "{from}");
    let text = GOOD.replacen(from, to, 1);
    let err = parse(&text).expect_err(to);
    assert_eq!(err.line, Some(line), "{to}: {err}");
    let shown = err.to_string();
    assert!(shown.starts_with(&format!("/etc/blockproof/nightly.toml line {line}: ")), "{shown}");
    assert!(shown.contains(message), "{to}: {shown}");
    assert!(!shown.contains('\n'), "one line: {shown}");
}

#[test]
fn invalid_jobs_are_refused_naming_the_line() {
    refused("version = 1", "version = 2", 1, "job files of version 1");
    refused("password_file = \"pw\"", "password_fil = \"pw\"", 6, "unknown field");
    refused("password_file = \"pw\"", "password_file = \"pw\"\npassword_env = \"X\"", 7, "not both");
    refused("every = \"6h\"", "every = \"5h\"", 13, "dividing a day");
    refused("at = \"00:30\"", "at = \"25:00\"", 14, "HH:MM");
    refused("parallel = 3", "parallel = 0", 17, "from 1 to 64");
    refused("parallel = 3", "parallel = \"3\"", 17, "invalid type");
    refused("verify = \"2%\"", "verify = \"200%\"", 20, "verify");
    refused("retention = { keep_daily = 7 }", "retention = { keep_dialy = 7 }", 21, "unknown field");
    refused("retention = { keep_daily = 7 }", "retention = { }", 21, "keeps nothing");
    refused("detect_within = \"7d\"", "detect_within = \"soon\"", 25, "detect_within");
    refused("detect_within = \"7d\"", "detect_within = \"3h\"", 25, "shorter than the interval");
    refused("detect_within = \"7d\"", "detect_within = \"7d\"\nverify = \"1%\"", 25, "not both");
    refused("timeout = \"20s\"", "timeout = \"0s\"", 26, "more than zero");
    refused("[\"/bin/true\"]", "[]", 26, "command is empty");
    refused("source=disks/web01.img\"]", "source=disks/web01.img,cbt=maybe\"]", 31, "disk sda");
    refused("source=disks/web01.img\"]", "source=disks/web01.img\", \"id=sda,source=x\"]", 31, "listed twice");
    refused("name = \"web01\"", "name = \"web 01\"", 30, "vm name");
    refused("name = \"web01\"", "name = \"db01\"", 33, "listed twice");
    refused("group = \"db\"", "group = \"dbs\"", 35, "no [groups.dbs]");
    refused("disks = [\"id=sda,source=disks/web01.img\"]", "disks = []", 29, "has no disks");
    refused("tags = [\"prod\"]", "tags = [\"prod\"]\ndisks = [\"id=a,source=b\"]", 23, "belongs in a [[vm]]");
    // The keys of running-VM sources are reserved, and say so.
    refused("name = \"web01\"", "name = \"web01\"\ndomain = \"web01\"", 31, "running-VM sources");
    refused("[run]", "[libvirt]\nuri = \"qemu:///system\"\n\n[run]", 16, "running-VM sources");
    // Syntax errors carry the line too.
    refused("[run]", "[run", 16, "");
}

#[test]
fn an_objective_needs_a_schedule_and_a_job_needs_vms() {
    let no_schedule = GOOD.replacen("[schedule]\nevery = \"6h\"\nat = \"00:30\"\n", "", 1);
    let err = parse(&no_schedule).unwrap_err();
    assert!(err.to_string().contains("detect_within needs a [schedule]"), "{err}");
    assert!(err.line.is_some());
    let no_vms = &GOOD[..GOOD.find("[[vm]]").unwrap()];
    assert!(parse(no_vms).unwrap_err().to_string().contains("no [[vm]]"));
    let missing = Job::load(Path::new("/no/such/job.toml")).unwrap_err();
    assert!(missing.to_string().starts_with("/no/such/job.toml: cannot read it"), "{missing}");
}

/// The annotated example in examples/ is a valid job, and says what the docs say.
#[test]
fn the_example_job_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/nightly.toml");
    let job = Job::load(&path).unwrap();
    assert_eq!((job.name.as_str(), job.parallel, job.vms.len(), job.notify.len()), ("nightly", 4, 2, 2));
    assert_eq!(job.vms[0].verify.text, "14.3%", "7 days at one run a day");
    assert_eq!(job.vms[1].verify.text, "5%");
    assert_eq!(job.vms[1].pre.as_ref().unwrap().timeout.as_secs(), 120);
}

/// `[restore_test]`: its defaults, its values, and its errors naming the line.
#[test]
fn restore_tests_in_a_job() {
    assert_eq!(parse(GOOD).unwrap().restore_test, None, "off unless asked for");
    let with = |section: &str| GOOD.replacen("[run]", &format!("{section}\n\n[run]"), 1);
    let p = parse(&with("[restore_test]")).unwrap().restore_test.unwrap();
    assert_eq!((p.every.as_secs(), p.per_run, p.sample, p.expect.len()), (7 * 86400, 1, 0.05, 0));
    let text = with("[restore_test]\nevery = \"2d\"\nper_run = 3\nsample = \"100%\"\nexpect = [\"/etc/hostname\"]");
    let p = parse(&text).unwrap().restore_test.unwrap();
    assert_eq!((p.every.as_secs(), p.per_run, p.sample), (2 * 86400, 3, 1.0));
    assert_eq!(p.expect, ["/etc/hostname"]);
    for (bad, message) in [
        ("per_run = 0", "from 1 to 1000"),
        ("every = \"often\"", "every"),
        ("sample = \"150%\"", "from 0% to 100%"),
        ("expect = [\"etc/hostname\"]", "absolute path"),
        ("evry = \"1d\"", "unknown field"),
    ] {
        let err = parse(&with(&format!("[restore_test]\n{bad}"))).expect_err(bad);
        assert_eq!(err.line, Some(17), "{bad}: {err}");
        assert!(err.to_string().contains(message), "{bad}: {err}");
    }
    // A boot test instead of the filesystem walk.
    assert_eq!(p.boot, None);
    let text = with("[restore_test]\nevery = \"7d\"\n\n[restore_test.boot]\nconsole_marker = \"login:\"\nguest_agent = true\ntimeout = \"10m\"\nmemory = 2048\ncpus = 4\nfirmware = \"uefi\"");
    let b = parse(&text).unwrap().restore_test.unwrap().boot.unwrap();
    assert_eq!((b.console_marker.as_deref(), b.guest_agent, b.timeout.as_secs()), (Some("login:"), true, 600));
    assert_eq!((b.memory_mib, b.cpus, b.uefi, b.kernel), (2048, 4, true, None));
    let b = parse(&with("[restore_test.boot]\nguest_agent = true")).unwrap().restore_test.unwrap().boot.unwrap();
    assert_eq!((b.memory_mib, b.cpus, b.uefi, b.timeout.as_secs()), (512, 2, false, 300), "the defaults of --boot");
    for (bad, message) in [
        ("[restore_test.boot]\nfail_marker = \"panic\"", "needs a check"),
        ("[restore_test.boot]\nguest_agent = true\nappend = \"quiet\"", "need kernel"),
        ("[restore_test.boot]\nguest_agent = true\ncpus = 0", "from 1 to 64"),
        ("[restore_test.boot]\nguest_agent = true\nfirmware = \"coreboot\"", "coreboot"),
        ("[restore_test.boot]\nguest_agent = true\nscript = \"/bin/true\"", "unknown field"),
        ("[restore_test]\nsample = \"10%\"\n[restore_test.boot]\nguest_agent = true", "reads no files"),
    ] {
        let err = parse(&with(bad)).expect_err(bad);
        assert!(err.line.is_some() && err.to_string().contains(message), "{bad}: {err}");
    }
}
