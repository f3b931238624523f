#!/usr/bin/env bash
# Runs the benchmarks (scripts/bench.py) and writes BENCHMARKS.md. As root; private network
# namespaces only. Pass --quick for a smoke run (with --sizes 1000,10000 for the scaling sections
# 7-9); --only SECTION --out FILE for one section alone (`python3 scripts/bench.py --help` lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/bench.sh must run as root (network namespaces, nftables)" >&2
    exit 1
fi
bash scripts/install-deps.sh
for pkg in conntrack time; do
    dpkg -s "$pkg" >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
done
cargo build --release --locked -q --bin masqd --example flowgen
exec python3 scripts/bench.py "$@"
