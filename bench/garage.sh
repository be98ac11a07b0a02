#!/usr/bin/env bash
# Starts a single-node Garage (S3-compatible object store) on loopback for benchmarks and
# manual trials: bench/garage.sh DIR [BUCKET]. Prints the environment to use (eval it);
# stop it with: kill $(cat DIR/garage.pid). The tests start their own (crates/cli/tests/garage).
set -euo pipefail
dir=$(realpath -m "${1:?usage: bench/garage.sh DIR [BUCKET]}")
bucket=${2:-blockproof}
command -v garage >/dev/null || { echo "garage is missing: cargo install garage --locked" >&2; exit 1; }
mkdir -p "$dir"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rpc=$(port); s3=$(port); admin=$(port)
cat > "$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admin"
TOML
g() { garage -c "$dir/garage.toml" "$@"; }
garage -c "$dir/garage.toml" server > "$dir/garage.log" 2>&1 &
echo $! > "$dir/garage.pid"
for _ in $(seq 100); do g status >/dev/null 2>&1 && break; sleep 0.1; done
node=$(g node id -q 2>/dev/null | cut -d@ -f1)
g layout assign -z dc1 -c 10G "$node" >/dev/null
g layout apply --version 1 >/dev/null
key_id="GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
g key import --yes -n blockproof "$key_id" "$secret" >/dev/null
g bucket create "$bucket" >/dev/null
g bucket allow --read --write --owner "$bucket" --key "$key_id" >/dev/null
echo "export AWS_ACCESS_KEY_ID=$key_id AWS_SECRET_ACCESS_KEY=$secret AWS_REGION=garage"
echo "export BLOCKPROOF_S3_ENDPOINT=http://127.0.0.1:$s3"
