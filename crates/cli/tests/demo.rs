//! The README's main job: `blockproof demo` runs to completion and says what it proved,
//! including the change-tracking lie it caught and healed.

mod harness;

use harness::Dir;

#[test]
fn demo_runs_and_proves_its_claims() {
    let dir = Dir::new();
    let out = dir.cmd("demo").arg("--dir").arg(dir.join("tour")).ok();
    for claim in
        ["bit-exact", "caught in run", "kept as tainted", "healed: snapshot", "refuses, writes no file", "Proved in"]
    {
        assert!(out.contains(claim), "the demo does not say {claim:?}:\n{out}");
    }
    assert!(!out.contains("DIFFERENT"), "{out}");
    // The image ends with exactly one blockproof bitmap, and no qemu-nbd is left behind.
    let bitmaps = harness::qemu::bitmaps(&dir.join("tour/vm-disk.qcow2"));
    assert_eq!(bitmaps.iter().filter(|(n, _)| n.starts_with("blockproof/")).count(), 1, "{bitmaps:?}");
    harness::qemu::assert_no_qemu_nbd_for(&dir);
}
