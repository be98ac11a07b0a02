//! `--disk id=ID,source=SOURCE[,cbt=CBT][,verify=BUDGET]`. The syntax is the one a job
//! file's disks use (`blockproof_fleet::disk`, one parser for both); from the command
//! line, every error in it is a usage error.

use blockproof_core::DiskInput;
use blockproof_fleet::disk::DiskSpec;

use crate::Usage;

/// The backup input a `--disk` spec names.
pub fn input(spec: &str) -> Result<DiskInput, Usage> {
    DiskSpec::parse(spec).and_then(DiskSpec::input).map_err(Usage)
}

/// The same for `verify`, which compares with the source as it is: a change source
/// given in the spec is ignored.
pub fn input_without_cbt(spec: &str) -> Result<DiskInput, Usage> {
    DiskSpec::parse(spec).and_then(DiskSpec::input_without_cbt).map_err(Usage)
}
