#!/usr/bin/env bash
# Runs the verification simulation (crates/core/examples/verification_sim.rs): long runs
# of synthetic incremental backups with change tracking that lies at random, sampled with
# blockproof's own selection code; prints runs-to-detection against the coverage bound
# for several budgets as a Markdown table.
#
# usage: bench/verification_sim.sh [CHUNKS=16384] [RUNS=400] [SEED=1]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
cargo run --release -q -p blockproof-core --example verification_sim -- "${1:-16384}" "${2:-400}" "${3:-1}"
