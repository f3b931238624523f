#!/bin/sh
# Regenerates the golden netlink batches of src/backend/nft/golden/*.hex: the exact bytes
# that nft(8) and iptables-nft(8) send, read with `strace -e trace=sendmsg -e write=all`, each
# command run in a private network namespace (`unshare -n`) so the host's ruleset is never
# touched. Run as root from the repository root: sh src/backend/nft/golden/capture.sh
# Captured with: nftables v1.0.6 (Lester Gooch #5), iptables v1.8.9 (nf_tables), strace 6.1.
set -eu
out=src/backend/nft/golden
skel='table inet masqd {
  set pod4 { type ipv4_addr; flags interval; }
  set nomasq4 { type ipv4_addr; flags interval; }
  chain postrouting { type nat hook postrouting priority srcnat - 1; policy accept; }
}'
# capture NAME DESCRIPTION COMMAND...: the last sendmsg buffer of COMMAND, as hex.
capture() {
  name=$1; desc=$2; shift 2
  tmp=$(mktemp)
  printf '%s\n' "$skel" > "$tmp.nft"
  unshare -n sh -c "nft -f '$tmp.nft' && strace -f -e trace=sendmsg -e write=all -o '$tmp' \"\$@\" >/dev/null" sh "$@"
  {
    echo "# $desc"
    echo "# captured by src/backend/nft/golden/capture.sh: unshare -n, then"
    echo "#   strace -e trace=sendmsg -e write=all $*"
    echo "# $(nft -v); $(iptables-nft -V)"
    # the hexdump of the last sendmsg that carries a batch
    awk '/sendmsg\(/ { n = 0 }
         /^ \| [0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]  / {
           k = split(substr($0, 11, 49), b, " "); for (i = 1; i <= k; i++) h[n++] = b[i] }
         END { s = ""; for (i = 0; i < n; i++) { s = s h[i]; if (i % 32 == 31) { print s; s = "" } } if (s != "") print s }' "$tmp"
  } > "$out/$name.hex"
  rm -f "$tmp" "$tmp.nft"
}
rule() { printf 'add rule inet masqd postrouting %s\n' "$1" > /tmp/masqd-golden.nft; }
rule 'ip saddr @pod4 counter masquerade'
capture masquerade 'nft: add rule inet masqd postrouting ip saddr @pod4 counter masquerade' nft -f /tmp/masqd-golden.nft
rule 'ip saddr @pod4 counter masquerade fully-random'
capture masquerade-fully-random 'nft: add rule inet masqd postrouting ip saddr @pod4 counter masquerade fully-random' nft -f /tmp/masqd-golden.nft
rule 'ip saddr @pod4 ip daddr @nomasq4 counter snat ip to ip saddr'
capture guard 'nft: add rule inet masqd postrouting ip saddr @pod4 ip daddr @nomasq4 counter snat ip to ip saddr' nft -f /tmp/masqd-golden.nft
rule 'meta mark & 0x00004000 == 0x00004000 return'
capture mark 'nft: add rule inet masqd postrouting meta mark & 0x00004000 == 0x00004000 return' nft -f /tmp/masqd-golden.nft
rule 'oifname "docker0" return'
capture bridge 'nft: add rule inet masqd postrouting oifname "docker0" return' nft -f /tmp/masqd-golden.nft
printf 'add element inet masqd nomasq4 { 10.96.0.0/12, 172.7.0.0/16 }\n' > /tmp/masqd-golden.nft
capture elements 'nft: add element inet masqd nomasq4 { 10.96.0.0/12, 172.7.0.0/16 }' nft -f /tmp/masqd-golden.nft
capture iptables-nft-masquerade 'iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE' \
  iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE
capture iptables-nft-masquerade-nooif 'iptables-nft -t nat -A POSTROUTING -s 10.0.0.0/20 -j MASQUERADE' \
  iptables-nft -t nat -A POSTROUTING -s 10.0.0.0/20 -j MASQUERADE
capture ip6tables-nft-masquerade 'ip6tables-nft -t nat -A POSTROUTING -s fd00:7:21::/64 ! -o docker+ -j MASQUERADE' \
  ip6tables-nft -t nat -A POSTROUTING -s fd00:7:21::/64 ! -o docker+ -j MASQUERADE
capture iptables-nft-snat 'iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 -j SNAT --to-source 192.0.2.1' \
  iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 -j SNAT --to-source 192.0.2.1
capture add-chain 'nft: add chain inet masqd postrouting { type nat hook postrouting priority srcnat - 1; policy accept; }' \
  nft add chain inet masqd postrouting '{ type nat hook postrouting priority srcnat - 1; policy accept; }'
capture flush-set 'nft: flush set inet masqd nomasq4' nft flush set inet masqd nomasq4
rm -f /tmp/masqd-golden.nft
