#!/usr/bin/env bash
# The demo: a throw-away two-node cluster in network namespaces (scripts/cluster.sh) with the
# broad default masquerade rule on node A. It shows which source address pod B and an outside
# host see, before and after `masqd apply` runs inside node A's namespace. The host's own
# firewall is never touched; the namespaces are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/demo.sh must run as root (network namespaces, nftables)" >&2
    exit 1
fi
bash scripts/install-deps.sh
cargo build --release --locked -q
MASQD=$PWD/target/release/masqd

P=masqd-demo
WORK=$(mktemp -d)
cleanup() { bash scripts/cluster.sh down "$P"; rm -rf "$WORK"; }
trap cleanup EXIT
bash scripts/cluster.sh up "$P"

# The embedded default: node A's policy.
cat >"$WORK/masqd.toml" <<'TOML'
[node]
pod_cidrs = ["172.7.21.0/24", "fd00:7:21::/64"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16", "fd00:7::/32"]
nonmasquerade_cidrs = []
bridge_interfaces = ["docker0"]
TOML
masqd() { ip netns exec "$P-a" "$MASQD" --config "$WORK/masqd.toml" --state-dir "$WORK/state" "$@"; }

# seen SERVER-NS LISTEN-ADDRESS DIAL-ADDRESS: the source address the server sees for a TCP
# connection from pod A.
port=8000
seen() {
    port=$((port + 1))
    local out="$WORK/seen.$port"
    ip netns exec "$1" socat -T5 "$2:$port,reuseaddr" SYSTEM:'echo "$SOCAT_PEERADDR"' >"$out" 2>/dev/null &
    local pid=$!
    for _ in $(seq 50); do
        ip netns exec "$1" ss -Hltn "sport = :$port" | grep -q . && break
        sleep 0.05
    done
    ip netns exec "$P-pa" socat -T5 - "$3:$port" </dev/null 2>/dev/null || echo "(no answer)"
    wait "$pid" 2>/dev/null || true
}

show() {
    printf '  pod A (172.7.21.2)   -> pod B   172.7.22.2    : pod B sees   %s\n' "$(seen "$P-pb" TCP4-LISTEN TCP4:172.7.22.2)"
    printf '  pod A (172.7.21.2)   -> outside 10.200.0.3    : outside sees %s\n' "$(seen "$P-out" TCP4-LISTEN TCP4:10.200.0.3)"
    printf '  pod A (fd00:7:21::2) -> pod B   fd00:7:22::2  : pod B sees   %s\n' "$(seen "$P-pb" TCP6-LISTEN 'TCP6:[fd00:7:22::2]')"
    printf '  pod A (fd00:7:21::2) -> outside fd00:200::3   : outside sees %s\n' "$(seen "$P-out" TCP6-LISTEN 'TCP6:[fd00:200::3]')"
}

echo "== Before: node A (10.200.0.1, fd00:200::1) has the broad default rule (iptables-nft):"
ip netns exec "$P-a" iptables-nft -t nat -S POSTROUTING | sed 's/^/    /'
ip netns exec "$P-a" ip6tables-nft -t nat -S POSTROUTING | sed 's/^/    /'
show
echo "   -> pod B sees node A's address: the client pod is hidden."
echo
echo "== masqd plan (node A):"
masqd plan | sed 's/^/    /' || true
echo
echo "== masqd apply (node A):"
masqd apply | sed 's/^/    /'
echo
echo "== After:"
show
echo "   -> pod B sees pod A's own address; the outside world still sees node A."
echo
echo "== masqd status (node A):"
masqd status | sed 's/^/    /'
echo
echo "== nft list table inet masqd (node A):"
ip netns exec "$P-a" nft list table inet masqd | sed 's/^/    /'
echo
echo "== masqd teardown (node A) puts the default rule back:"
masqd teardown | sed 's/^/    /'
ip netns exec "$P-a" iptables-nft -t nat -S POSTROUTING | sed 's/^/    /'
