#!/usr/bin/env bash
# The whole test suite: installs what it needs (Debian packages), checks formatting and lints,
# then runs the unit tests and the integration tests. The integration tests run as root in
# private network namespaces of their own; the host's firewall is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh must run as root (network namespaces, nftables)" >&2
    exit 1
fi
bash scripts/install-deps.sh
bash scripts/check-msrv.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked --all-targets
