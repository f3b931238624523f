#!/usr/bin/env python3
"""Regenerates fuzz/corpus/netlink/: real kernel answers (dumps, errors, change notifications),
one datagram per file, captured in a private network namespace, plus the hand-made odd cases
(NLMSG_DONE flagged NLM_F_DUMP_INTR, an errno of i32::MIN). Run as root from the repository
root: python3 fuzz/make-netlink-corpus.py <path to masqd>. Never touches the host's ruleset."""
import os, socket, struct, subprocess, sys

NS = "mqcorpus%d" % os.getpid()
OUT = "fuzz/corpus/netlink"
NFT = 10  # NFNL_SUBSYS_NFTABLES
GETTABLE, GETCHAIN, GETRULE, GETSET, GETSETELEM, GETGEN = 1, 4, 7, 10, 13, 16
DUMP, ACK, REQ = 0x300, 4, 1


def nla(ty, data):
    n = 4 + len(data)
    return struct.pack("=HH", n, ty) + data + b"\0" * (-n % 4)


def nlmsg(kind, flags, seq, family, attrs=b""):
    body = struct.pack("=BBH", family, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def sh(*cmd, stdin=None):
    subprocess.run(["ip", "netns", "exec", NS, *cmd], input=stdin, check=True)


def capture(sock, req, name, seq):
    sock.send(req)
    n = 0
    while True:
        data = sock.recv(1 << 18)
        with open(f"{OUT}/{name}-{n}.bin", "wb") as f:
            f.write(data)
        n += 1
        done = False
        off = 0
        while off + 16 <= len(data):
            ln, kind = struct.unpack_from("=IH", data, off)
            if kind in (2, 3) and struct.unpack_from("=I", data, off + 8)[0] == seq:
                done = True
            off += (ln + 3) & ~3
        if done or n > 50:
            return


def main():
    masqd = os.path.abspath(sys.argv[1])
    os.makedirs(OUT, exist_ok=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        cfg = "/tmp/%s.toml" % NS
        with open(cfg, "w") as f:
            f.write('[node]\npod_cidrs = ["172.7.21.0/24", "fd00:7:21::/64"]\n'
                    '[masquerade]\ncluster_cidrs = ["172.7.0.0/16", "fd00:7::/32"]\n'
                    'bridge_interfaces = ["docker0"]\n')
        sh("nft", "-f", "-", stdin=b"""
table ip nat {
  chain POSTROUTING {
    type nat hook postrouting priority srcnat;
    ip saddr 172.7.21.0/24 oifname != "cni0" counter masquerade
    ip saddr 172.16.0.0/12 snat to 192.0.2.1
  }
}
table ip6 nat {
  chain POSTROUTING {
    type nat hook postrouting priority srcnat;
    ip6 saddr fd00:7:21::/64 masquerade random,fully-random
  }
}
table inet other {
  chain post {
    type nat hook postrouting priority 100;
    ip saddr != 172.7.21.0/24 meta l4proto tcp masquerade to :1024-2048
  }
}
""")
        sh("iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "172.7.21.0/24",
           "!", "-o", "docker0", "-j", "MASQUERADE")
        sh("ip6tables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "fd00:7:21::/64",
           "-j", "SNAT", "--to-source", "fd00::1")
        state = "/tmp/%s.state" % NS
        sh(sys.executable, os.path.abspath(__file__), "--inside", "pre-")
        sh(masqd, "--config", cfg, "--state-dir", state, "apply")
        sh(sys.executable, os.path.abspath(__file__), "--inside", "")
        os.remove(cfg)
        subprocess.run(["rm", "-rf", state])
    finally:
        subprocess.run(["ip", "netns", "del", NS])
    handmade()


def inside(prefix):
    """The captures, run inside the namespace; names start with `prefix`."""
    if True:  # noqa: one block, as captured
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
        s.bind((0, 0))
        s.setsockopt(270, 11, 1)  # NETLINK_EXT_ACK
        t = lambda k: (NFT << 8) | k
        seq = 100
        for name, kind, fam, attrs in [
            ("tables", GETTABLE, 0, b""), ("chains", GETCHAIN, 0, b""),
            ("rules", GETRULE, 0, b""), ("sets", GETSET, 1, nla(1, b"masqd\0")),
            ("elements4", GETSETELEM, 1, nla(1, b"masqd\0") + nla(2, b"nomasq4\0")),
            ("elements6", GETSETELEM, 1, nla(1, b"masqd\0") + nla(2, b"nomasq6\0")),
            ("missing-chain", GETRULE, 2, nla(1, b"nat\0") + nla(2, b"nope\0")),
        ]:
            seq += 1
            capture(s, nlmsg(t(kind), REQ | DUMP | ACK, seq, fam, attrs), prefix + name, seq)
        seq += 1
        capture(s, nlmsg(t(GETGEN), REQ | ACK, seq, 0), prefix + "genid", seq)
        if prefix:
            return
        m = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
        m.bind((0, 1 << (3 - 1)))  # NFNLGRP_NFTABLES
        subprocess.run(["nft", "add table ip ev; add chain ip ev c; add rule ip ev c counter;"
                        " delete table ip ev"], check=True)
        m.settimeout(1)
        try:
            for n in range(20):
                with open(f"{OUT}/events-{n}.bin", "wb") as f:
                    f.write(m.recv(1 << 18))
        except socket.timeout:
            pass


def handmade():
    # Hand-made: a dump whose final DONE alone carries NLM_F_DUMP_INTR (16); error fields
    # that do not negate; a length running past the datagram.
    done = lambda flags, err: struct.pack("=IHHIIi", 20, 3, 2 | flags, 5, 0, err)
    with open(f"{OUT}/done-intr.bin", "wb") as f:
        f.write(open(f"{OUT}/rules-0.bin", "rb").read() + done(16, 0))
    with open(f"{OUT}/error-min.bin", "wb") as f:
        f.write(struct.pack("=IHHIIi", 20, 2, 0, 5, 0, -2**31) + done(0, -2**31))
    with open(f"{OUT}/bad-length.bin", "wb") as f:
        f.write(struct.pack("=IHHII", 4096, 16 << 0 | NFT << 8, 2, 5, 0) + b"\0" * 8)


if __name__ == "__main__":
    inside(sys.argv[2]) if sys.argv[1] == "--inside" else main()
