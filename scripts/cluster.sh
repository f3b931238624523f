#!/usr/bin/env bash
# A throw-away two-node Flannel-style cluster in network namespaces (never the host's firewall):
#
#   <p>-pa (pod A 172.7.21.2, fd00:7:21::2) ── docker0 ── <p>-a (node A 10.200.0.1, fd00:200::1) ─┐
#   <p>-pb (pod B 172.7.22.2, fd00:7:22::2) ── docker0 ── <p>-b (node B 10.200.0.2, fd00:200::2) ─┼─ br0 in <p>-sw
#                                                         <p>-out (outside 10.200.0.3, fd00:200::3)┘
#
# Cluster network 172.7.0.0/16 and fd00:7::/32; each node routes the other node's pod subnet to it.
# The outside host has no route to the pod subnets (so only masqueraded traffic gets answers).
# Node A carries the broad default rule, written by iptables-nft as Docker/flannel would:
#   -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE   (and the IPv6 twin)
#
# With WRITER=legacy the default rule is written by iptables-legacy instead (older Docker).
#
# usage: cluster.sh up PREFIX [nft|legacy] | down PREFIX
set -euo pipefail

cmd=${1:?usage: cluster.sh up|down PREFIX [nft|legacy]}
p=${2:?usage: cluster.sh up|down PREFIX [nft|legacy]}
writer=${3:-nft}
case "$writer" in nft | legacy) ;; *) echo "writer must be nft or legacy" >&2; exit 2 ;; esac
A=$p-a B=$p-b PA=$p-pa PB=$p-pb OUT=$p-out SW=$p-sw

down() {
    for n in "$PA" "$PB" "$A" "$B" "$OUT" "$SW"; do
        ip netns del "$n" 2>/dev/null || true
    done
}

attach() { # ns ipv4 ipv6 switch-port
    ip -n "$1" link add eth0 type veth peer name "$4" netns "$SW"
    ip -n "$SW" link set "$4" master br0 up
    ip -n "$1" addr add "$2/24" dev eth0
    ip -n "$1" addr add "$3/64" dev eth0 nodad
    ip -n "$1" link set eth0 up
}

pod() { # pod-ns node-ns subnet-octet
    ip -n "$2" link add docker0 type bridge
    ip -n "$2" addr add "172.7.$3.1/24" dev docker0
    ip -n "$2" addr add "fd00:7:$3::1/64" dev docker0 nodad
    ip -n "$2" link set docker0 up
    ip -n "$1" link add eth0 type veth peer name vpod netns "$2"
    ip -n "$2" link set vpod master docker0 up
    ip -n "$1" addr add "172.7.$3.2/24" dev eth0
    ip -n "$1" addr add "fd00:7:$3::2/64" dev eth0 nodad
    ip -n "$1" link set eth0 up
    ip -n "$1" route add default via "172.7.$3.1"
    ip -n "$1" -6 route add default via "fd00:7:$3::1"
    ip netns exec "$2" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
}

up() {
    down
    for n in "$SW" "$A" "$B" "$OUT" "$PA" "$PB"; do
        ip netns add "$n"
        ip -n "$n" link set lo up
    done
    ip -n "$SW" link add br0 type bridge
    ip -n "$SW" link set br0 up
    attach "$A" 10.200.0.1 fd00:200::1 pa
    attach "$B" 10.200.0.2 fd00:200::2 pb
    attach "$OUT" 10.200.0.3 fd00:200::3 pout
    pod "$PA" "$A" 21
    pod "$PB" "$B" 22
    ip -n "$A" route add 172.7.22.0/24 via 10.200.0.2
    ip -n "$A" -6 route add fd00:7:22::/64 via fd00:200::2
    ip -n "$B" route add 172.7.21.0/24 via 10.200.0.1
    ip -n "$B" -6 route add fd00:7:21::/64 via fd00:200::1
    ip netns exec "$A" "iptables-$writer" -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE
    ip netns exec "$A" "ip6tables-$writer" -t nat -A POSTROUTING -s fd00:7:21::/64 ! -o docker0 -j MASQUERADE
}

case "$cmd" in
up) up ;;
down) down ;;
*) echo "usage: cluster.sh up|down PREFIX" >&2; exit 2 ;;
esac
