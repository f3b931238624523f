#!/usr/bin/env python3
"""Helpers shared by scripts/bench.py and its section modules (bench_scale.py, bench_follow.py):
running tools in private network namespaces and timing them, the test policies, raw nf_tables
netlink (event sockets, a table deletion), and `masqd run` under a fake service manager."""

import ctypes
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASQD = os.path.join(ROOT, "target", "release", "masqd")
FLOWGEN = os.path.join(ROOT, "target", "release", "examples", "flowgen")
CLUSTER = os.path.join(ROOT, "scripts", "cluster.sh")
POD = "172.7.21.0/24"
NAMESPACES = []
DAEMONS = []

# netlink / nf_tables constants (linux/netlink.h, linux/netfilter/nf_tables.h)
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE = 0, 2
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFT_MSG_NEWRULE, NFT_MSG_DELRULE = 6, 8
NFT_MSG_NEWGEN = 15
CLONE_NEWNET = 0x40000000


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(args, check=True, input=None, capture=True):
    r = subprocess.run(args, input=input, stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.PIPE if capture else None)
    if check and r.returncode != 0:
        raise RuntimeError(f"{args[:6]}… failed ({r.returncode}): {r.stderr.decode()[-2000:]}")
    return r


def netns(name):
    run(["ip", "netns", "add", name])
    NAMESPACES.append(name)
    run(["ip", "-n", name, "link", "set", "lo", "up"])
    return name


def netns_del(name):
    subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
    if name in NAMESPACES:
        NAMESPACES.remove(name)


def in_ns(ns, *args):
    return ["ip", "netns", "exec", ns, *args]


def measure(args, input=None):
    """Runs a command; returns wall s, user s, sys s (wait4 rusage) and peak RSS KiB. The peak
    RSS comes from GNU time's %M: a child spawned straight from this (large) python process
    inherits its high-water mark until exec, which would hide the tool's own."""
    rss_file = tempfile.mktemp(prefix="masqd-bench-rss-")
    args = ["/usr/bin/time", "-f", "%M", "-o", rss_file, *args]
    t = time.perf_counter()
    p = subprocess.Popen(args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if input is not None:
        p.stdin.write(input)
        p.stdin.close()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{args[:6]}… exited {p.returncode}: {err.decode()[-2000:]}")
    with open(rss_file) as f:
        rss = int(f.read().split()[-1])
    os.unlink(rss_file)
    return {"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "rss": rss}


def cidrs(n, base=0x0B000000):
    """n disjoint, non-adjacent /28s: n intervals in a kernel interval set."""
    out = []
    for i in range(n):
        a = base + i * 32
        out.append(f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}/28")
    return out


def write_config(path, exceptions, mode="nft", list_file=None, extra=""):
    """A masqd config with the exceptions in the TOML array, or in `list_file` (one per line);
    `extra` is appended (more TOML sections, e.g. `[daemon]`)."""
    if list_file:
        with open(list_file, "w") as f:
            f.write("\n".join(exceptions) + "\n")
        ex = f'nonmasquerade_cidrs_file = "{list_file}"'
    else:
        ex = "nonmasquerade_cidrs = [" + ",".join(f'"{c}"' for c in exceptions) + "]"
    text = (f'[node]\npod_cidrs = ["{POD}"]\n[masquerade]\ncluster_cidrs = []\n'
            f'{ex}\nbridge_interfaces = ["docker0"]\n[backend]\nmode = "{mode}"\n{extra}')
    with open(path, "w") as f:
        f.write(text)


def ipmasq_payload(exceptions):
    """The ip-masq-agent layout: one RETURN rule per CIDR, then MASQUERADE."""
    lines = ["*nat", ":IP-MASQ-AGENT - [0:0]", f"-A POSTROUTING -s {POD} -j IP-MASQ-AGENT"]
    lines += [f"-A IP-MASQ-AGENT -d {c} -j RETURN" for c in exceptions]
    lines += ["-A IP-MASQ-AGENT -j MASQUERADE", "COMMIT", ""]
    return "\n".join(lines).encode()


def set_size(ns, name="nomasq4"):
    out = run(in_ns(ns, "nft", "-j", "list", "set", "inet", "masqd", name)).stdout
    for o in json.loads(out)["nftables"]:
        if "set" in o:
            return len(o["set"].get("elem", []))
    return 0


def verify_masqd(ns, cfg, state, n):
    got = set_size(ns)
    if got != n:
        raise RuntimeError(f"kernel set holds {got} intervals, expected {n}")
    r = run(in_ns(ns, MASQD, "--config", cfg, "--state-dir", state, "plan"), check=False)
    if r.returncode != 0:
        raise RuntimeError(f"masqd plan after apply: exit {r.returncode}")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


# --------------------------------------------------------------------------- netlink events

libc = ctypes.CDLL(None, use_errno=True)


def ns_socket(ns, groups=()):
    """A NETLINK_NETFILTER socket created inside `ns` (from a thread that entered it)."""
    box = {}

    def work():
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            box["err"] = ctypes.get_errno()
            return
        os.close(fd)
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        s.bind((0, 0))
        for g in groups:
            s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, g)
        s.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE
        box["s"] = s

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "s" not in box:
        raise RuntimeError(f"setns failed: errno {box.get('err')}")
    return box["s"]


def delete_table(sock):
    """`nft delete table inet masqd` as one raw netlink batch; returns when the kernel acked."""
    def msg(typ, flags, seq, family, res_id, payload=b""):
        return struct.pack("=IHHII", 16 + 4 + len(payload), typ, flags, seq, 0) + \
            struct.pack("=BBH", family, 0, socket.htons(res_id)) + payload
    name = b"masqd\0"
    attr = struct.pack("=HH", 4 + len(name), 1) + name + b"\0" * ((-len(name)) % 4)
    batch = msg(0x10, 1, 1, 0, 10) + msg((10 << 8) | 2, 1 | 4, 2, 1, 0, attr) + msg(0x11, 1, 3, 0, 10)
    sock.send(batch)
    while True:
        data = sock.recv(65536)
        ln, typ, _f, seq, _pid = struct.unpack_from("=IHHII", data, 0)
        if typ == 2 and seq == 2:
            err = struct.unpack_from("=i", data, 16)[0]
            if err != 0:
                raise RuntimeError(f"delete table: errno {-err}")
            return time.perf_counter()


def monitor_socket(ns):
    """A NETLINK_NETFILTER socket subscribed to NFNLGRP_NFTABLES inside `ns`."""
    return ns_socket(ns, groups=(NFNLGRP_NFTABLES,))


def events(sock, deadline):
    """Yields (time, msg type, pid, table) for each nftables notification until `deadline`."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        sock.settimeout(left)
        try:
            data = sock.recv(1 << 20)
        except socket.timeout:
            return
        except OSError as e:
            if e.errno == 105:  # ENOBUFS: notifications were lost; keep listening
                continue
            raise
        now = time.perf_counter()
        off = 0
        while off + 16 <= len(data):
            ln, typ, _flags, _seq, pid = struct.unpack_from("=IHHII", data, off)
            if ln < 16:
                break
            body = data[off + 16: off + ln]
            table = None
            if len(body) >= 8:
                alen, atyp = struct.unpack_from("=HH", body, 4)
                if atyp & 0x3FFF == 1 and alen > 4:
                    table = body[8: 4 + alen].split(b"\0")[0].decode(errors="replace")
            yield now, typ & 0xFF, pid, table
            off += (ln + 3) & ~3


def drain(sock):
    sock.setblocking(False)
    try:
        while True:
            sock.recv(1 << 20)
    except (BlockingIOError, socket.timeout):
        pass
    finally:
        sock.setblocking(True)


# --------------------------------------------------------------------------- the daemon

class Daemon:
    def __init__(self, ns, cfg, state, watchdog=False, path=None):
        self.dir = tempfile.mkdtemp(prefix="masqd-bench-")
        self.sock_path = os.path.join(self.dir, "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.sock_path)
        env = dict(os.environ, NOTIFY_SOCKET=self.sock_path)
        if path:
            env["PATH"] = path
        if not watchdog:
            env.pop("WATCHDOG_USEC", None)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(in_ns(ns, MASQD, "--config", cfg, "--state-dir", state,
                                           "--log-level", "warn", "run"),
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        DAEMONS.append(self.proc)
        self.cond = threading.Condition()
        self.notes = []  # (time, message), read continuously like a service manager does
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        while True:
            try:
                m = self.notify.recv(65536).decode()
            except OSError:
                return
            with self.cond:
                self.notes.append((time.perf_counter(), m))
                self.cond.notify_all()

    def wait(self, what, timeout=120):
        deadline = time.perf_counter() + timeout
        with self.cond:
            while True:
                for t, m in self.notes:
                    if what in m:
                        return t
                left = deadline - time.perf_counter()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"daemon: no {what} within {timeout}s (exit {self.proc.poll()})")
                self.cond.wait(left)

    def repairs(self):
        """The repairs count of the last STATUS= line."""
        with self.cond:
            for _, m in reversed(self.notes):
                if "STATUS=" in m and "repairs " in m:
                    return int(m.split("repairs ")[1].split(";")[0].split()[0])
        return 0

    def wait_repairs(self, k, timeout=20):
        """Time the STATUS= line reporting `k` repairs arrived (sent right after the reconcile's
        transaction was acknowledged)."""
        return self.wait(f"repairs {k}", timeout)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # busy in a long reconcile, not reading its signalfd
            self.proc.kill()
            self.proc.wait()
        if self.proc in DAEMONS:
            DAEMONS.remove(self.proc)
        self.notify.close()


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def proc_cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime



# --------------------------------------------------------------------------- one CIDR through the daemon

def daemon_one_cidr(n, ex, extra, trials, tmp, kind, timeout=5.0, may_miss=False):
    """`trials` renames through `masqd run`, each timed from rename(2) to the kernel's element
    notification. A rename not applied within `timeout` s is an error, or with `may_miss` the
    row's last figure (inf: "> timeout") and the end of the row."""
    ns = netns("mqb-one-daemon")
    d_dir = tempfile.mkdtemp(prefix="daemon-", dir=tmp)
    live = os.path.join(d_dir, "masqd.toml")
    if kind == "list file":
        lst = os.path.join(d_dir, "nonmasq.list")
        write_config(live, ex, list_file=lst)
        variants = ["\n".join(ex + extra) + "\n", "\n".join(ex) + "\n"]
        target = lst
    else:
        write_config(live, ex)
        a, b = os.path.join(d_dir, "a"), os.path.join(d_dir, "b")
        write_config(a, ex)
        write_config(b, ex + extra)
        variants = [open(b).read(), open(a).read()]
        target = live
    d = Daemon(ns, live, os.path.join(d_dir, "state"))
    d.wait("READY=1")
    mon = monitor_socket(ns)
    lat = []
    for i in range(trials):
        tmpf = target + ".new"
        with open(tmpf, "w") as g:
            g.write(variants[i % 2])
        drain(mon)
        t0 = time.perf_counter()
        os.rename(tmpf, target)
        seen_elem = None
        for t, typ, pid, table in events(mon, t0 + timeout):
            if typ in (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM) and table == "masqd" and seen_elem is None:
                seen_elem = t
            if typ == NFT_MSG_NEWGEN and seen_elem is not None:
                break
        if seen_elem is None and may_miss:
            lat.append(float("inf"))
            break
        if seen_elem is None:
            raise RuntimeError(f"daemon ({kind}) did not apply the renamed file within {timeout:.0f} s")
        lat.append(seen_elem - t0)
        time.sleep(0.05)
    want = n + 1 if (trials - 1) % 2 == 0 else n
    if lat and lat[-1] == float("inf"):
        pass  # the last rename is still pending: nothing to compare the kernel with
    elif n > 250000:  # a dump costs minutes here: the changed CIDR and its neighbours by key instead
        x = extra[0].split("/")[0]
        if has_element(ns, x) != (want == n + 1) or not has_element(ns, ex[-1].split("/")[0]):
            raise RuntimeError(f"daemon left {x} {'out' if want == n + 1 else 'in'}")
    elif set_size(ns) != want:
        raise RuntimeError(f"daemon left {set_size(ns)} intervals, expected {want}")
    d.stop()
    mon.close()
    netns_del(ns)
    return {"wall": median(lat), "p99": pct(lat, 99), "trials": len(lat), "missed": lat[-1] == float("inf")}


# --------------------------------------------------------------------------- shared by the section modules

LIMIT = 120.0  # a tool still running after this many seconds is stopped (killed) and reported so


def timed(args, input=None, limit=LIMIT, capture=False):
    """Runs a command under GNU time, like `measure`, with a limit: past `limit` s its process
    group is killed and the result says `stopped`. Returns wall, user and sys s (wait4 rusage of
    the whole tree), peak RSS KiB, the exit code, and its stdout when `capture`. Input and output
    go through files, so a 100 MB restore payload cannot dead-lock on a pipe."""
    fd, rss_file = tempfile.mkstemp(prefix="masqd-bench-rss-")
    os.close(fd)
    out_f = tempfile.TemporaryFile() if capture else subprocess.DEVNULL
    err_f = tempfile.TemporaryFile()
    in_f = subprocess.DEVNULL
    if input is not None:
        in_f = tempfile.TemporaryFile()
        in_f.write(input)
        in_f.seek(0)
    t = time.perf_counter()
    p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rss_file, *args], stdin=in_f,
                         stdout=out_f, stderr=err_f, start_new_session=True)
    stopped = threading.Event()

    def stop():
        stopped.set()
        try:
            os.killpg(p.pid, 9)
        except ProcessLookupError:
            pass
    timer = threading.Timer(limit, stop)
    timer.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    res = {"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "rss": 0, "rc": p.returncode,
           "stopped": stopped.is_set(), "out": b""}
    with open(rss_file) as f:
        words = f.read().split()
    os.unlink(rss_file)
    if words and words[-1].isdigit():
        res["rss"] = int(words[-1])
    if capture:
        out_f.seek(0)
        res["out"] = out_f.read()
    err_f.seek(0)
    res["err"] = err_f.read()[-2000:].decode(errors="replace")
    if not res["stopped"] and res["rc"] != 0 and res["rc"] is not None:
        res["failed"] = True
    return res


def summary(samples):
    """Medians of wall/user/sys/rss over `samples` (dicts from `timed`), the spread of wall
    (min, max), the count, and whether a run was stopped at the limit."""
    done = [s for s in samples if not s.get("stopped")]
    out = {"n": len(done), "stopped": len(done) < len(samples)}
    for k in ("wall", "user", "sys", "rss"):
        out[k] = median([s[k] for s in done])
    out["min"] = min((s["wall"] for s in done), default=float("nan"))
    out["max"] = max((s["wall"] for s in done), default=float("nan"))
    return out


def cpu_s(pid):
    """utime and stime of a process so far, in seconds (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / hz, int(fields[12]) / hz


def vm_rss_kib(pid):
    return int(proc_status(pid)["VmRSS"].split()[0])


def scrape(path):
    """GET /metrics from masqd's unix-socket listener: {"name{labels}": value}. Empty on error."""
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: masqd\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
    except OSError:
        return {}
    out = {}
    for line in data.decode(errors="replace").split("\r\n\r\n", 1)[-1].splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def metric_sum(m, name):
    """The sum of a metric over all its label sets (e.g. every `object` of the dump counter)."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


# nf_tables netlink batches, as the nft CLI sends them (linux/netfilter/nfnetlink.h, nf_tables.h)
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 1, 4, 0x400, 0x800
NFPROTO_INET, NFPROTO_IPV4 = 1, 2


def nl_attr(typ, payload):
    return struct.pack("=HH", 4 + len(payload), typ) + payload + b"\0" * ((-len(payload)) % 4)


def nl_str(typ, s):
    return nl_attr(typ, s.encode() + b"\0")


class Batches:
    """A NETLINK_NETFILTER socket inside a netns that sends one-message nf_tables transactions
    and waits for the kernel's acknowledgement of each: a foreign writer that is never the
    bottleneck of what it measures (no process start, no cache dump, unlike the nft CLI)."""

    def __init__(self, ns):
        self.sock = ns_socket(ns)
        self.seq = 100

    def commit(self, msg_type, flags, family, attrs):
        s0 = self.seq
        self.seq += 3

        def msg(typ, fl, seq, fam, res_id, payload=b""):
            return struct.pack("=IHHII", 20 + len(payload), typ, fl, seq, 0) + \
                struct.pack("=BBH", fam, 0, socket.htons(res_id)) + payload
        batch = msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, s0, 0, NFNL_SUBSYS_NFTABLES) + \
            msg((NFNL_SUBSYS_NFTABLES << 8) | msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, s0 + 1,
                family, 0, attrs) + \
            msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, s0 + 2, 0, NFNL_SUBSYS_NFTABLES)
        self.sock.send(batch)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _f, seq, _pid = struct.unpack_from("=IHHII", data, off)
                if typ == 2 and seq == s0 + 1:
                    err = struct.unpack_from("=i", data, off + 16)[0]
                    if err != 0:
                        raise RuntimeError(f"nf_tables batch type {msg_type}: errno {-err}")
                    return time.perf_counter()
                off += max(16, (ln + 3) & ~3)

    def add_rule(self, table, chain):
        """`nft add rule ip TABLE CHAIN` with no statement (an empty rule: the kernel allows it)."""
        return self.commit(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, NFPROTO_IPV4,
                           nl_str(1, table) + nl_str(2, chain))

    def flush_chain(self, table, chain, family=NFPROTO_IPV4):
        """`nft flush chain ip TABLE CHAIN` (a DELRULE naming the chain only)."""
        return self.commit(NFT_MSG_DELRULE, 0, family, nl_str(1, table) + nl_str(2, chain))

    def close(self):
        self.sock.close()


class Churn:
    """A kube-proxy-like writer in its own thread: adds one rule to its own chain of `table ip
    nat`, then flushes it, `rate` commits a second (one transaction each, through `Batches`),
    until `count` commits were made or `stop()`. `commits` counts the acknowledged ones."""

    def __init__(self, ns, rate, chain="KUBE-BENCH-CHURN", count=None):
        self.b = Batches(ns)
        self.rate, self.chain, self.count = rate, chain, count
        self.commits, self.late, self.error = 0, 0, None
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._work, daemon=True)

    def start(self):
        self.t0 = time.perf_counter()
        self.thread.start()
        return self

    def _work(self):
        try:
            i = 0
            while not self.halt.is_set() and (self.count is None or i < self.count):
                due = self.t0 + i / self.rate
                wait = due - time.perf_counter()
                if wait > 0:
                    self.halt.wait(wait)
                elif wait < -1 / self.rate:
                    self.late += 1
                if self.halt.is_set():
                    break
                if i % 2 == 0:
                    self.b.add_rule("nat", self.chain)
                else:
                    self.b.flush_chain("nat", self.chain)
                self.commits += 1
                i += 1
        except Exception as e:  # reported by stop()
            self.error = e
        self.t1 = time.perf_counter()

    def join(self):
        self.thread.join()
        return self._done()

    def stop(self):
        self.halt.set()
        self.thread.join()
        return self._done()

    def _done(self):
        self.b.close()
        if self.error:
            raise RuntimeError(f"churn writer: {self.error}")
        return {"commits": self.commits, "seconds": self.t1 - self.t0, "late": self.late}


def kube_ruleset(n_rules, churn_chain="KUBE-BENCH-CHURN"):
    """`nft -f` text of a kube-proxy-like `table ip nat` (the chains iptables-nft makes for
    kube-proxy: KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-* with the masquerade mark and a DNAT,
    KUBE-POSTROUTING masquerading marked packets) holding exactly `n_rules` rules (at least 7),
    plus an empty chain `churn_chain` for a churn writer. Chains come before their users."""
    n_fixed = 7  # KUBE-MARK-MASQ 1, KUBE-POSTROUTING 3, the three base chains 1 each
    services = (n_rules - n_fixed) // 4
    lines = ["table ip nat {", f"\tchain {churn_chain} {{ }}",
             "\tchain KUBE-MARK-MASQ { meta mark set meta mark | 0x4000; }",
             "\tchain KUBE-POSTROUTING { meta mark & 0x4000 != 0x4000 return; "
             "meta mark set meta mark ^ 0x4000; masquerade; }"]
    svc_rules = []
    for i in range(services):
        vip, ep = f"10.96.{i >> 8}.{i & 255}", f"10.244.{i >> 8}.{i & 255}"
        lines.append(f"\tchain KUBE-SEP-{i:05d} {{ ip saddr {ep} jump KUBE-MARK-MASQ; "
                     f"tcp dport 80 dnat to {ep}:8080; }}")
        lines.append(f"\tchain KUBE-SVC-{i:05d} {{ jump KUBE-SEP-{i:05d}; }}")
        svc_rules.append(f"ip daddr {vip} tcp dport 80 jump KUBE-SVC-{i:05d};")
    svc_rules += ["counter;"] * (n_rules - n_fixed - 4 * services)  # the exact count
    lines.append("\tchain KUBE-SERVICES { " + " ".join(svc_rules) + " }")
    lines += ["\tchain PREROUTING { type nat hook prerouting priority dstnat; policy accept; jump KUBE-SERVICES; }",
              "\tchain OUTPUT { type nat hook output priority -100; policy accept; jump KUBE-SERVICES; }",
              "\tchain POSTROUTING { type nat hook postrouting priority srcnat; policy accept; "
              "jump KUBE-POSTROUTING; }", "}"]
    return "\n".join(lines) + "\n"


def rule_count(ns, family, table):
    """Rules in one table, from `nft -j list table` (a rule dump: linear for a few thousand)."""
    out = json.loads(run(in_ns(ns, "nft", "-j", "list", "table", family, table)).stdout)
    return sum(1 for o in out["nftables"] if "rule" in o)


def has_element(ns, ip, table="masqd", set_name="nomasq4"):
    """Whether the kernel's set holds an element starting at `ip` (an IPv4 address): one
    NFT_MSG_GETSETELEM for that key, a single lookup at any set size (`nft get element` of nft
    1.0.6 dumps the whole set first)."""
    s = ns_socket(ns)
    try:
        key = nl_attr(0x8000 | 1, nl_attr(1, socket.inet_aton(ip)))  # NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE }
        elems = nl_attr(0x8000 | 3, nl_attr(0x8000 | 1, key))  # NFTA_SET_ELEM_LIST_ELEMENTS { NFTA_LIST_ELEM }
        payload = struct.pack("=BBH", NFPROTO_INET, 0, 0) + nl_str(1, table) + nl_str(2, set_name) + elems
        s.send(struct.pack("=IHHII", 16 + len(payload), (NFNL_SUBSYS_NFTABLES << 8) | 13,
                           NLM_F_REQUEST | NLM_F_ACK, 1, 0) + payload)
        found = False
        while True:
            data = s.recv(65536)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _f, _seq, _pid = struct.unpack_from("=IHHII", data, off)
                if typ == 2:
                    err = struct.unpack_from("=i", data, off + 16)[0]
                    if err not in (0, -2):
                        raise RuntimeError(f"GETSETELEM {ip}: errno {-err}")
                    return found and err == 0
                if typ & 0xFF == NFT_MSG_NEWSETELEM:
                    found = True
                off += max(16, (ln + 3) & ~3)
    finally:
        s.close()
