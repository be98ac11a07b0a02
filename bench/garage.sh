#!/usr/bin/env bash
# Starts Garage (S3-compatible object store) on loopback for benchmarks and manual trials:
# bench/garage.sh DIR [BUCKET] [NODES]. One node by default (replication factor 1); with
# NODES > 1 a cluster as the tests' Garage::cluster makes it (crates/cli/tests/harness/
# garage.rs): NODES processes, each with its own ports and directory DIR/nodeK and a zone
# of its own, replication factor NODES. Prints the environment to use (eval it; every
# node's endpoint, comma-separated, in BLOCKPROOF_S3_ENDPOINT); DIR/garage.pid lists the
# processes, one per line: stop them with kill $(cat DIR/garage.pid).
set -euo pipefail
dir=$(realpath -m "${1:?usage: bench/garage.sh DIR [BUCKET] [NODES]}")
bucket=${2:-blockproof}
nodes=${3:-1}
command -v garage >/dev/null || { echo "garage is missing: cargo install garage --locked" >&2; exit 1; }
mkdir -p "$dir"
: > "$dir/garage.pid"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
endpoints=()
configs=()
rpcs=()
for k in $(seq "$nodes"); do
  if [ "$nodes" = 1 ]; then d=$dir; else d=$dir/node$k; fi
  mkdir -p "$d"
  rpc=$(port); s3=$(port); admin=$(port)
  cat > "$d/garage.toml" <<TOML
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "sqlite"
replication_factor = $nodes
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admin"
TOML
  garage -c "$d/garage.toml" server > "$d/garage.log" 2>&1 &
  echo $! >> "$dir/garage.pid"
  endpoints+=("http://127.0.0.1:$s3")
  configs+=("$d/garage.toml")
  rpcs+=("127.0.0.1:$rpc")
done
g() { garage -c "${configs[0]}" "$@"; }
ids=()
for k in $(seq 0 $((nodes - 1))); do
  for _ in $(seq 300); do garage -c "${configs[$k]}" status >/dev/null 2>&1 && break; sleep 0.1; done
  ids+=("$(garage -c "${configs[$k]}" node id -q 2>/dev/null | cut -d@ -f1)")
done
for k in $(seq 1 $((nodes - 1))); do
  g node connect "${ids[$k]}@${rpcs[$k]}" >/dev/null
done
for k in $(seq 0 $((nodes - 1))); do
  g layout assign -z "dc$((k + 1))" -c 10G "${ids[$k]}" >/dev/null
done
g layout apply --version 1 >/dev/null
key_id="GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
key_secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
g key import --yes -n blockproof "$key_id" "$key_secret" >/dev/null
g bucket create "$bucket" >/dev/null
g bucket allow --read --write --owner "$bucket" --key "$key_id" >/dev/null
# Every node knows the layout and the key before the first request.
for c in "${configs[@]}"; do
  for _ in $(seq 600); do garage -c "$c" key info "$key_id" >/dev/null 2>&1 && break; sleep 0.1; done
done
echo "export AWS_ACCESS_KEY_ID=$key_id AWS_SECRET_ACCESS_KEY=$key_secret AWS_REGION=garage"
echo "export BLOCKPROOF_S3_ENDPOINT=$(IFS=,; echo "${endpoints[*]}")"
