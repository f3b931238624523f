#!/usr/bin/env bash
# Installs the Debian packages masqd's build, demo and tests need (the Rust toolchain is assumed).
# libclang-dev: rustables generates its kernel bindings with bindgen at build time.
set -euo pipefail
pkgs=(libclang-dev nftables iptables iproute2 socat systemd)
need=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
    echo "installing: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
