#!/usr/bin/env bash
# Runs the verification simulation (crates/core/examples/verification_sim.rs): long runs
# of synthetic incremental backups with change tracking that lies, sampled with
# blockproof's own selection code. Prints four Markdown tables (docs/VERIFICATION.md,
# "Simulation"):
#   1. runs to detection against the coverage bound (single-chunk lies; seed SEED only);
#   2. lies spanning extents: what the escalation adds to what a detection reports;
#   3. write locality: a share of the budget next to reported extents, or on random chunks;
#   4. the sample's ties broken by segments (as blockproof does) or by scattered chunks.
# Rows of tables 2-4 add up SEEDS simulations (seeds SEED, SEED+1, ...). The defaults take
# about a minute on a 2-core machine (release build).
#
# usage: bench/verification_sim.sh [CHUNKS=16384] [RUNS=400] [SEED=1] [SEEDS=4]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
cargo run --release -q -p blockproof-core --example verification_sim -- \
  "${1:-16384}" "${2:-400}" "${3:-1}" "${4:-4}"
