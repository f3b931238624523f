#!/usr/bin/env python3
"""masqd benchmarks: masqd side by side with the tools ip-masq-agent, flannel and knftables-based
tools use, in one run on one machine, alternating, with medians and ratios.

Run as root from the repository (it installs nothing; `bash scripts/bench.sh` does):

    python3 scripts/bench.py [--quick] [--out BENCHMARKS.md] [--only SECTION] [--sizes 1000,10000]

SECTION: datapath, "legacy drift", scaling, "foreign churn", "one CIDR at scale",
"repair under commits", "listening cost" (sections 7-11 live in bench_scale.py and
bench_follow.py; the helpers all share are in bench_common.py).

Everything happens in private network namespaces created here and removed at the end; the
host's firewall is never touched. Each masqd run is checked against the kernel (the set holds
exactly the expected intervals), so nothing is fast by being wrong.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from bench_common import (CLUSTER, DAEMONS, FLOWGEN, MASQD, NAMESPACES, POD, ROOT, Daemon, cidrs,
                          daemon_one_cidr, delete_table, in_ns, ipmasq_payload, log, measure, median,
                          netns, netns_del, ns_socket, pct, proc_cpu_ticks, proc_status, run, set_size,
                          verify_masqd, write_config)
from bench_follow import (bench_churn, bench_listen_cost, bench_one_cidr_scale, bench_repair_load, report_churn,
                          report_listen_cost, report_one_cidr_scale, report_repair_load)
from bench_scale import bench_scaling, report_scaling

ONLY = ["datapath", "legacy drift", "scaling", "foreign churn", "one CIDR at scale", "repair under commits",
        "listening cost"]
SCALE_SIZES = [1000, 10000, 60000, 250000, 1000000]

# --------------------------------------------------------------------------- benchmarks

def bench_full_apply(sizes, runs, tmp):
    """1. Full apply from an empty node: masqd apply vs nft -f vs the ip-masq-agent layout
    through iptables-legacy-restore and iptables-nft-restore; each tool in its own netns."""
    results = {}
    for n in sizes:
        ex = cidrs(n)
        cfg = os.path.join(tmp, f"full-{n}.toml")
        write_config(cfg, ex)
        state = os.path.join(tmp, f"state-{n}")
        nft_file = os.path.join(tmp, f"full-{n}.nft")
        with open(nft_file, "wb") as f:
            f.write(run([MASQD, "--config", cfg, "export"]).stdout)
        payload = ipmasq_payload(ex)
        cfg_list = os.path.join(tmp, f"full-{n}-list.toml")
        write_config(cfg_list, ex, list_file=os.path.join(tmp, f"full-{n}.list"))
        ns = {t: netns(f"mqb-full-{t}-{n}") for t in ("masqd", "masqdl", "nft", "legacy", "iptnft")}
        tools = {
            "masqd apply": (
                lambda: run(in_ns(ns["masqd"], "nft", "delete", "table", "inet", "masqd"), check=False),
                lambda: measure(in_ns(ns["masqd"], MASQD, "--config", cfg, "--state-dir", state, "apply")),
                lambda: verify_masqd(ns["masqd"], cfg, state, n)),
            "masqd apply (list file)": (
                lambda: run(in_ns(ns["masqdl"], "nft", "delete", "table", "inet", "masqd"), check=False),
                lambda: measure(in_ns(ns["masqdl"], MASQD, "--config", cfg_list, "--state-dir", state, "apply")),
                lambda: verify_masqd(ns["masqdl"], cfg_list, state, n)),
            "nft -f": (
                lambda: run(in_ns(ns["nft"], "nft", "flush", "ruleset")),
                lambda: measure(in_ns(ns["nft"], "nft", "-f", nft_file)),
                lambda: None),
            "iptables-legacy-restore": (
                lambda: (run(in_ns(ns["legacy"], "iptables-legacy", "-t", "nat", "-F")),
                         run(in_ns(ns["legacy"], "iptables-legacy", "-t", "nat", "-X"))),
                lambda: measure(in_ns(ns["legacy"], "iptables-legacy-restore"), input=payload),
                lambda: None),
            "iptables-nft-restore": (
                lambda: run(in_ns(ns["iptnft"], "nft", "flush", "ruleset")),
                lambda: measure(in_ns(ns["iptnft"], "iptables-nft-restore"), input=payload),
                lambda: None),
        }
        names = list(tools)
        samples = {t: [] for t in names}
        for r in range(runs):
            order = names[r % len(names):] + names[:r % len(names)]
            for t in order:
                prep, go, check = tools[t]
                prep()
                samples[t].append(go())
                check()
        for t in names:
            s = samples[t]
            results[(n, t)] = {k: median([x[k] for x in s]) for k in ("wall", "user", "sys", "rss")}
        for name in ns.values():
            netns_del(name)
        log(f"  full apply N={n}: " + ", ".join(
            f"{t} {results[(n, t)]['wall'] * 1000:.1f} ms" for t in names))
    return results


def bench_one_cidr(n, runs, trials, tmp):
    """2. One CIDR added to / removed from an n-interval set."""
    ex = cidrs(n)
    extra = cidrs(1, base=0x0C000000)
    cfg_a = os.path.join(tmp, "one-a.toml")
    cfg_b = os.path.join(tmp, "one-b.toml")
    write_config(cfg_a, ex)
    write_config(cfg_b, ex + extra)
    state = os.path.join(tmp, "state-one")
    res = {}

    # masqd apply, one-shot, alternating +1 / -1.
    ns = netns("mqb-one-masqd")
    run(in_ns(ns, MASQD, "--config", cfg_a, "--state-dir", state, "apply"))
    s = []
    for r in range(runs):
        cfg, want = (cfg_b, n + 1) if r % 2 == 0 else (cfg_a, n)
        s.append(measure(in_ns(ns, MASQD, "--config", cfg, "--state-dir", state, "apply")))
        verify_masqd(ns, cfg, state, want)
    res["masqd apply (one-shot)"] = {k: median([x[k] for x in s]) for k in ("wall", "user", "sys", "rss")}
    netns_del(ns)

    # Full re-apply by the others, alternating n+1 / n.
    files = {}
    for tag, lst in (("a", ex), ("b", ex + extra)):
        # What a knftables-style tool does: declare, flush the set, add every element again.
        files[tag] = os.path.join(tmp, f"one-{tag}.nft")
        with open(files[tag], "w") as f:
            f.write("table inet masqd {\n\tset nomasq4 { type ipv4_addr; flags interval; }\n}\n")
            f.write("flush set inet masqd nomasq4\n")
            f.write("add element inet masqd nomasq4 { " + ", ".join(lst) + " }\n")
    ns_nft = netns("mqb-one-nft")
    run(in_ns(ns_nft, "nft", "-f", files["a"]))
    ns_leg = netns("mqb-one-legacy")
    ns_ipn = netns("mqb-one-iptnft")
    pay = {"a": ipmasq_payload(ex), "b": ipmasq_payload(ex + extra)}
    run(in_ns(ns_leg, "iptables-legacy-restore"), input=pay["a"])
    run(in_ns(ns_ipn, "iptables-nft-restore"), input=pay["a"])
    others = {"nft -f (flush set + all elements)": [], "iptables-legacy-restore (full)": [],
              "iptables-nft-restore (full)": []}
    for r in range(runs):
        tag = "b" if r % 2 == 0 else "a"
        others["nft -f (flush set + all elements)"].append(measure(in_ns(ns_nft, "nft", "-f", files[tag])))
        others["iptables-legacy-restore (full)"].append(measure(in_ns(ns_leg, "iptables-legacy-restore"), input=pay[tag]))
        others["iptables-nft-restore (full)"].append(measure(in_ns(ns_ipn, "iptables-nft-restore"), input=pay[tag]))
    for k, s in others.items():
        res[k] = {m: median([x[m] for x in s]) for m in ("wall", "user", "sys", "rss")}
    for x in (ns_nft, ns_leg, ns_ipn):
        netns_del(x)

    # The daemon: file renamed → element in the kernel, seen through netlink events; with the
    # exceptions in the TOML array, and in a list file.
    for kind in ("TOML array", "list file"):
        res[f"masqd run, {kind} (rename → element in kernel)"] = daemon_one_cidr(n, ex, extra, trials, tmp, kind)
    log("  one CIDR: " + ", ".join(f"{k} {v['wall'] * 1000:.2f} ms" for k, v in res.items()))
    return res


def bench_drift(sizes, trials, tmp):
    """3. Drift repair by the daemon: table deleted → restored, p50/p99."""
    res = {}
    for n in sizes:
        ns = netns(f"mqb-drift-{n}")
        cfg = os.path.join(tmp, f"drift-{n}.toml")
        write_config(cfg, cidrs(n))
        d = Daemon(ns, cfg, os.path.join(tmp, f"state-drift-{n}"))
        d.wait("READY=1")
        deleter = ns_socket(ns)
        lat = []
        for i in range(trials):
            # One deletion every 0.55 s: faster than 20 in 10 s trips masqd's rate limit for a
            # writer that keeps deleting its table (repairs then wait a second).
            time.sleep(0.55)
            before = d.repairs()
            t_del = delete_table(deleter)
            t_done = d.wait_repairs(before + 1, timeout=20)
            lat.append(t_done - t_del)
        deleter.close()
        if set_size(ns) != n:
            raise RuntimeError(f"N={n}: set holds {set_size(ns)} after repairs")
        d.stop()
        netns_del(ns)
        res[n] = {"p50": pct(lat, 50), "p99": pct(lat, 99), "trials": len(lat)}
        log(f"  drift N={n}: p50 {res[n]['p50'] * 1000:.2f} ms, p99 {res[n]['p99'] * 1000:.2f} ms")
    return res


LEGACY_BINARIES = [f"{fam}tables-legacy{s}" for fam in ("ip", "ip6") for s in ("", "-save", "-restore")]


def counting_path(tmp):
    """A PATH whose legacy binaries are wrappers that log each run, then exec the real one. The
    directory is root's and 0700, inside /run (root's, 0755): a directory masqd trusts."""
    wdir = tempfile.mkdtemp(prefix="masqd-bench-wrap-", dir="/run")
    counter = os.path.join(wdir, "runs")
    open(counter, "w").close()
    for b in LEGACY_BINARIES:
        w = os.path.join(wdir, b)
        with open(w, "w") as f:
            f.write(f"#!/bin/sh\necho {b} >> {counter}\nexec /usr/sbin/{b} \"$@\"\n")
        os.chmod(w, 0o755)
    return wdir, counter, f"{wdir}:/usr/sbin:/usr/bin:/sbin:/bin"


def bench_legacy_drift(trials, idle_s, tmp):
    """6. Legacy drift: a broad rule re-inserted at the head of legacy POSTROUTING while
    `masqd run` (legacy mode) watches → gone; and how many legacy binaries run while idle."""
    ns = netns("mqb-legacy")
    broad = ["-t", "nat", "-I", "POSTROUTING", "1", "-s", POD, "!", "-o", "docker0", "-j", "MASQUERADE"]
    run(in_ns(ns, "/usr/sbin/iptables-legacy", "-w", *broad))
    d_dir = tempfile.mkdtemp(prefix="legacy-", dir=tmp)
    cfg = os.path.join(d_dir, "masqd.toml")
    write_config(cfg, ["172.7.0.0/16"], mode="legacy")
    wdir, counter, path = counting_path(tmp)
    try:
        d = Daemon(ns, cfg, os.path.join(d_dir, "state"), path=path)
        d.wait("READY=1")
        time.sleep(1.0)
        before = len(open(counter).read().split())
        time.sleep(idle_s)
        idle_runs = len(open(counter).read().split()) - before
        gone = []
        rule = f"-A POSTROUTING -s {POD} ! -o docker0 -j MASQUERADE"
        for _ in range(trials):
            run(in_ns(ns, "/usr/sbin/iptables-legacy", "-w", *broad))
            t0 = time.perf_counter()
            while rule in run(in_ns(ns, "/usr/sbin/iptables-legacy-save", "-t", "nat")).stdout.decode():
                if time.perf_counter() - t0 > 10:
                    raise RuntimeError("masqd run did not remove the re-inserted broad rule in 10 s")
            gone.append(time.perf_counter() - t0)
            time.sleep(0.6)
        d.stop()
    finally:
        subprocess.run(["rm", "-rf", wdir])
    netns_del(ns)
    return {"gone": gone, "idle_runs": idle_runs, "idle_s": idle_s}


def report_legacy_drift(ld):
    if not ld:
        return []
    ms = lambda s: f"{s * 1000:.1f} ms"
    g = ld["gone"]
    per_min = ld["idle_runs"] * 60 / ld["idle_s"]
    return [
        "## 6. Legacy drift: a re-inserted broad rule, and binaries run while idle\n",
        "Legacy mode, one pod CIDR: `iptables-legacy -w -t nat -I POSTROUTING 1 -s POD ! -o docker0 "
        "-j MASQUERADE` while `masqd run` watches, then `iptables-legacy-save -t nat` polled until "
        "the rule is gone (each poll takes a few ms: the figure includes up to one poll's delay). "
        "masqd notices legacy changes on the xtables lock file and the nat table's "
        "`IPT_SO_GET_INFO`, without running a binary; the legacy binaries on its PATH are wrappers "
        "that count every run.\n",
        "| figure | value | target |",
        "|---|---:|---|",
        f"| insert → gone, median of {len(g)} | {ms(median(g))} | |",
        f"| insert → gone, worst of {len(g)} | {ms(max(g))} | under 50 ms: "
        f"{'met' if max(g) < 0.05 else 'MISSED'} |",
        f"| legacy binary runs per idle minute (measured over {ld['idle_s']:.0f} s) | {per_min:.0f} | "
        f"0: {'met' if ld['idle_runs'] == 0 else 'MISSED'} |",
        "",
    ]


def bench_datapath(n, flows, trials, linear_flows, guard_trials, tmp):
    """4. New flows per second from pod A to the outside through node A's NAT hook; then the
    guard of design.md §3.1 against the same policy with `return` (guard_vs_return)."""
    p = "mqbd"
    run(["bash", CLUSTER, "up", p, "nft"])
    for s in ("a", "b", "pa", "pb", "out", "sw"):
        NAMESPACES.append(f"{p}-{s}")
    A, PA, OUT = f"{p}-a", f"{p}-pa", f"{p}-out"
    # The outside host answers for a whole /16 (AnyIP) and drops the probes quietly.
    run(["ip", "-n", OUT, "route", "add", "local", "10.201.0.0/16", "dev", "lo"])
    run(["ip", "-n", A, "route", "add", "10.201.0.0/16", "via", "10.200.0.3"])
    run(in_ns(OUT, "nft", "add table ip sink; add chain ip sink in { type filter hook input priority 0; }; "
                          "add rule ip sink in udp dport 10000-20000 counter drop"))
    run(in_ns(A, "iptables-nft", "-t", "nat", "-F", "POSTROUTING"))
    run(in_ns(A, "ip6tables-nft", "-t", "nat", "-F", "POSTROUTING"))
    state = os.path.join(tmp, "state-dp")
    cfg1 = os.path.join(tmp, "dp-1.toml")
    cfgn = os.path.join(tmp, "dp-n.toml")
    write_config(cfg1, ["172.7.0.0/16"])
    write_config(cfgn, ["172.7.0.0/16"] + cidrs(n - 1))

    def rx():
        return int(run(in_ns(OUT, "cat", "/sys/class/net/eth0/statistics/rx_packets")).stdout)

    def trial(count):
        run(in_ns(A, "conntrack", "-F"), check=False)
        time.sleep(0.05)
        r0 = rx()
        out = run(in_ns(PA, FLOWGEN, "10.201.0.0", str(count))).stdout.split()
        elapsed = float(out[0])
        time.sleep(0.2)
        got = rx() - r0
        return got / elapsed, got

    variants = {}

    def setup_masqd(cfg):
        run(in_ns(A, "iptables-legacy", "-t", "nat", "-F"), check=False)
        run(in_ns(A, "iptables-legacy", "-t", "nat", "-X"), check=False)
        run(in_ns(A, MASQD, "--config", cfg, "--state-dir", state, "apply"))

    def setup_linear():
        run(in_ns(A, MASQD, "--config", cfg1, "--state-dir", state, "teardown"))
        run(in_ns(A, "iptables-nft", "-t", "nat", "-F", "POSTROUTING"))
        run(in_ns(A, "iptables-legacy-restore"), input=ipmasq_payload(["172.7.0.0/16"] + cidrs(n - 1)))

    plan = [("masqd, 1 exception", lambda: setup_masqd(cfg1), flows),
            (f"masqd, {n:,} exceptions (interval set)", lambda: setup_masqd(cfgn), flows),
            (f"ip-masq-agent layout, {n:,} RETURN rules (iptables-legacy)", setup_linear, linear_flows)]
    samples = {name: [] for name, _, _ in plan}
    for t in range(trials):
        for name, setup, count in plan:
            setup()
            rate, got = trial(count)
            if got < count * 0.95:
                log(f"  warning: {name}: {got} of {count} probes arrived")
            samples[name].append(rate)
    # Check: the probes were masqueraded (the outside saw node A), counted by masqd's rule.
    setup_masqd(cfgn)
    st0 = json.loads(run(in_ns(A, MASQD, "--config", cfgn, "--state-dir", state, "status", "--json")).stdout)
    trial(1000)
    st1 = json.loads(run(in_ns(A, MASQD, "--config", cfgn, "--state-dir", state, "status", "--json")).stdout)
    masq = st1["ipv4"]["masqueraded_connections"] - st0["ipv4"]["masqueraded_connections"]
    if masq < 990:
        raise RuntimeError(f"only {masq} of 1000 probes were masqueraded")
    for name in samples:
        variants[name] = median(samples[name])
        log(f"  datapath {name}: {variants[name]:,.0f} new flows/s")
    run(["bash", CLUSTER, "down", p])
    for s in ("a", "b", "pa", "pb", "out", "sw"):
        if f"{p}-{s}" in NAMESPACES:
            NAMESPACES.remove(f"{p}-{s}")
    guard = guard_vs_return({"1": ["172.7.0.0/16"], f"{n:,}": ["172.7.0.0/16"] + cidrs(n - 1)},
                            flows, guard_trials, tmp)
    return variants, guard


# Destinations of the guard comparison. Excepted: inside 172.7.0.0/16 (the exception of both sets)
# but off the pod subnets, routed by node A to the outside host, which answers for it (AnyIP).
# flowgen walks BASE + i, so one run must stay under 32,768 addresses (the /17); a trial is several
# runs, each from a new socket (a new source port): every probe is a new flow.
GUARD_DEST = {"excepted": ("172.7.128.0", "172.7.128.0/17"), "masqueraded": ("10.201.0.0", "10.201.0.0/16")}
GUARD_CHUNK = 12500


def guard_layout(variant, exceptions):
    """`nft -f` text replacing table inet masqd atomically. "guard": design.md §3.1 (identity SNAT
    at srcnat - 1, the masquerade-mark rule); "return": the same sets and rules at srcnat, no mark
    rule, `return` instead of the identity SNAT."""
    guard = variant == "guard"
    rules = ['oifname "docker0" return']
    if guard:
        rules.append("meta mark & 0x4000 == 0x4000 return")
    rules.append("ip saddr @pod4 ip daddr @nomasq4 counter " + ("snat ip to ip saddr" if guard else "return"))
    rules.append("ip saddr @pod4 counter masquerade")
    return ("add table inet masqd\ndelete table inet masqd\ntable inet masqd {\n"
            f"\tset pod4 {{ type ipv4_addr; flags interval; elements = {{ {POD} }} }}\n"
            f"\tset nomasq4 {{ type ipv4_addr; flags interval; elements = {{ {', '.join(exceptions)} }} }}\n"
            "\tchain postrouting {\n"
            f"\t\ttype nat hook postrouting priority {'srcnat - 1' if guard else 'srcnat'}; policy accept;\n"
            + "".join(f"\t\t{r}\n" for r in rules) + "\t}\n}\n")


def guard_chain(ns):
    """What the kernel holds in inet masqd postrouting: the priority, the exception rule's verdict,
    whether the mark rule is there, and the packet counters of the exception and masquerade rules."""
    out = json.loads(run(in_ns(ns, "nft", "-j", "list", "chain", "inet", "masqd", "postrouting")).stdout)
    st = {"prio": None, "except": None, "mark": False, "except_pkts": None, "masq_pkts": None, "rules": 0}
    for o in out["nftables"]:
        if "chain" in o:
            st["prio"] = o["chain"].get("prio")
        elif "rule" in o:
            st["rules"] += 1
            ex = o["rule"]["expr"]
            pkts = next((e["counter"]["packets"] for e in ex if "counter" in e), None)
            if any("match" in e and e["match"].get("right") == "@nomasq4" for e in ex):
                st["except"] = "snat" if any("snat" in e for e in ex) else \
                    "return" if any("return" in e for e in ex) else "?"
                st["except_pkts"] = pkts
            elif any("masquerade" in e for e in ex):
                st["masq_pkts"] = pkts
            elif any("match" in e and "&" in (e["match"].get("left") or {}) for e in ex):
                st["mark"] = True
    return st


def probe_sources(ns):
    """Packets the outside host received from the pod's own address and from node A's."""
    out = json.loads(run(in_ns(ns, "nft", "-j", "list", "table", "ip", "probesrc")).stdout)
    got = {}
    for o in out["nftables"]:
        if "rule" in o:
            ex = o["rule"]["expr"]
            src = next(e["match"]["right"] for e in ex if "match" in e)
            got[src] = next(e["counter"]["packets"] for e in ex if "counter" in e)
    return got["172.7.21.2"], got["10.200.0.1"]


def guard_cluster(p):
    """A cluster (cluster.sh) whose node A has no NAT chain at all (iptables-nft's tables with the
    broad rule are dropped; legacy is never touched), with both destinations routed to the outside
    host, which counts the probes by source address."""
    run(["bash", CLUSTER, "up", p, "nft"])
    for s in ("a", "b", "pa", "pb", "out", "sw"):
        NAMESPACES.append(f"{p}-{s}")
    c = {"p": p, "A": f"{p}-a", "PA": f"{p}-pa", "OUT": f"{p}-out"}
    for _, net in GUARD_DEST.values():
        run(["ip", "-n", c["OUT"], "route", "add", "local", net, "dev", "lo"])
        run(["ip", "-n", c["A"], "route", "add", net, "via", "10.200.0.3"])
    run(in_ns(c["OUT"], "nft", "add table ip sink; add chain ip sink in { type filter hook input priority 0; }; "
                               "add rule ip sink in udp dport 10000-20000 counter drop; "
                               "add table ip probesrc; add chain ip probesrc in { type filter hook input priority -10; }; "
                               "add rule ip probesrc in ip saddr 172.7.21.2 udp dport 10000-20000 counter; "
                               "add rule ip probesrc in ip saddr 10.200.0.1 udp dport 10000-20000 counter"))
    run(in_ns(c["A"], "nft", "flush", "ruleset"))
    return c


def guard_vs_return(sets, flows, trials, tmp):
    """The guard's cost: new flows/s from a pod with the layout of design.md §3.1 ("guard") and with
    the same sets and rules but `return` at srcnat ("return"), each loaded with `nft -f`; for each
    exception set, to an excepted and to a masqueraded destination. Two identical clusters of their
    own, one per variant, so that both are measured interleaved (flowgen runs of GUARD_CHUNK flows,
    one cluster then the other, then the other way round): the speed of this VM drifts by 10-30 %
    over seconds, the same for both. The variants swap clusters trial by trial (trials is even), so
    a difference between the clusters cancels out. Their node A has no NAT chain but the one
    under test (the first cluster's node A keeps legacy iptable_nat and iptables-nft's `ip nat`
    chains registered: the guard's binding skips them, `return` does not). Every trial is checked:
    after each load the chain and the set are read back and no other NAT table exists; each
    flowgen run made one new conntrack entry per probe (else its socket reused an earlier run's
    source port, and the measurement is repeated); after the probes, the rule that must have seen
    them counted exactly the probes sent, the other one none, and the outside host saw the
    expected source address and no other."""
    trials += trials % 2
    clusters = [guard_cluster("mqbg"), guard_cluster("mqbh")]
    files = {}
    for sname, ex in sets.items():
        for v in ("guard", "return"):
            files[(sname, v)] = os.path.join(tmp, f"guard-{v}-{len(ex)}.nft")
            with open(files[(sname, v)], "w") as f:
                f.write(guard_layout(v, ex))
    want = {"guard": (99, "snat", True), "return": (100, "return", False)}
    chunks = -(-flows // GUARD_CHUNK)
    chunks += chunks % 2  # XY YX …: each variant goes first equally often
    per = [flows // chunks + (1 if i < flows % chunks else 0) for i in range(chunks)]
    samples = {(s, v, k): [] for s in sets for v in want for k in GUARD_DEST}
    paired = {(s, k): [] for s in sets for k in GUARD_DEST}

    def load(c, sname, v):
        A = c["A"]
        run(in_ns(A, "nft", "-f", files[(sname, v)]))
        st = guard_chain(A)
        if (st["prio"], st["except"], st["mark"]) != want[v] or st["rules"] != (4 if v == "guard" else 3) \
                or st["except_pkts"] != 0 or st["masq_pkts"] != 0:
            raise RuntimeError(f"{v} layout not as loaded: {st}")
        if set_size(A) != len(sets[sname]):
            raise RuntimeError(f"{v}: nomasq4 holds {set_size(A)}, expected {len(sets[sname])}")
        tables = run(in_ns(A, "nft", "list", "tables")).stdout.decode().split("\n")
        legacy = run(in_ns(A, "cat", "/proc/net/ip_tables_names"), check=False).stdout.decode().split()
        if [t for t in tables if t] != ["table inet masqd"] or "nat" in legacy:
            raise RuntimeError(f"{c['p']}: node A has other NAT chains: {tables}, legacy {legacy}")
        return st, probe_sources(c["OUT"])

    def ct_count(c):
        return int(run(in_ns(c["A"], "cat", "/proc/sys/net/netfilter/nf_conntrack_count")).stdout)

    def probe(kind, roles, last, first):
        """Probes to `kind` through both clusters, interleaved; checks them; returns flows/s per variant."""
        for attempt in range(3):
            rates = probe_once(kind, roles, last, first)
            if rates:
                return rates
            # A flowgen run got the source port of an earlier one (all runs probe the same
            # addresses): its probes were not new flows. Counters moved on; measure again.
            log(f"  {kind}: a source port was reused, probes were not all new flows; repeating")
            for v, c in roles.items():
                last[v] = (guard_chain(c["A"]), probe_sources(c["OUT"]))
        raise RuntimeError(f"{kind}: source ports reused three times")

    def probe_once(kind, roles, last, first):
        for c in roles.values():
            run(in_ns(c["A"], "conntrack", "-F"), check=False)
        time.sleep(0.05)
        elapsed, sent = {v: 0.0 for v in roles}, {v: 0 for v in roles}
        ct = {v: ct_count(c) for v, c in roles.items()}
        order = [first, "return" if first == "guard" else "guard"]
        reused = False
        for r, count in enumerate(per):
            for v in (order if r % 2 == 0 else order[::-1]):
                out = run(in_ns(roles[v]["PA"], FLOWGEN, GUARD_DEST[kind][0], str(count))).stdout.split()
                elapsed[v] += float(out[0])
                sent[v] += count - int(out[1])
                n = ct_count(roles[v])  # every probe sent must have made a new conntrack entry
                reused |= n - ct[v] < count - int(out[1])
                ct[v] = n
        time.sleep(0.2)
        if reused:
            return None
        rates = {}
        for v, c in roles.items():
            (st0, src0), st, src = last[v], guard_chain(c["A"]), probe_sources(c["OUT"])
            last[v] = (st, src)
            d_exc, d_masq = st["except_pkts"] - st0["except_pkts"], st["masq_pkts"] - st0["masq_pkts"]
            d_pod, d_node = src[0] - src0[0], src[1] - src0[1]
            # (the rule that must count them, the other rule), (from the expected source, from the other)
            (counted, other), (arrived, stray) = ((d_exc, d_masq), (d_pod, d_node)) if kind == "excepted" \
                else ((d_masq, d_exc), (d_node, d_pod))
            if counted != sent[v] or other != 0 or stray != 0 or arrived > sent[v]:
                raise RuntimeError(f"{v}, {kind}: {sent[v]} probes sent; exception rule counted {d_exc}, "
                                   f"masquerade rule {d_masq}; the outside saw {d_pod} from the pod, "
                                   f"{d_node} from the node")
            if arrived < sent[v] * 0.95:
                log(f"  warning: {v}, {kind}: {arrived} of {sent[v]} probes arrived")
            rates[v] = arrived / elapsed[v]
        return rates

    for t in range(trials):
        roles = {"guard": clusters[t % 2], "return": clusters[(t + 1) % 2]}
        for sname in sets:
            last = {v: load(c, sname, v) for v, c in roles.items()}
            for i, kind in enumerate(("excepted", "masqueraded") if t % 2 == 0 else ("masqueraded", "excepted")):
                rates = probe(kind, roles, last, "guard" if (t // 2 + i) % 2 == 0 else "return")
                for v, x in rates.items():
                    samples[(sname, v, kind)].append(x)
                paired[(sname, kind)].append(rates["guard"] / rates["return"])
        log(f"  guard trial {t + 1}/{trials} (guard in {roles['guard']['p']}): " + ", ".join(
            f"N={s} {k} {paired[(s, k)][-1]:.3f}" for s in sets for k in GUARD_DEST))
    for c in clusters:
        run(["bash", CLUSTER, "down", c["p"]])
        for s in ("a", "b", "pa", "pb", "out", "sw"):
            if f"{c['p']}-{s}" in NAMESPACES:
                NAMESPACES.remove(f"{c['p']}-{s}")
    res = {}
    for s in sets:
        for k in GUARD_DEST:
            g, r, pr = samples[(s, "guard", k)], samples[(s, "return", k)], paired[(s, k)]
            res[(s, k)] = {"guard": median(g), "return": median(r), "ratio": median(pr),
                           "paired_min": min(pr), "paired_max": max(pr), "trials": len(pr)}
            log(f"  guard N={s}, {k}: guard {median(g):,.0f}, return {median(r):,.0f} flows/s, "
                f"guard/return {res[(s, k)]['ratio']:.3f} (range {min(pr):.3f}-{max(pr):.3f})")
    return {"res": res, "flows": flows, "chunks": chunks, "chunk": per[0]}


def bench_footprint(n, idle_s, tmp):
    """5. The daemon with n exceptions: start-to-READY, RSS, CPU while idle, binary size."""
    ns = netns("mqb-foot")
    cfg = os.path.join(tmp, "foot.toml")
    write_config(cfg, cidrs(n))
    d = Daemon(ns, cfg, os.path.join(tmp, "state-foot"))
    ready = d.wait("READY=1") - d.t0
    pid = d.proc.pid
    st = proc_status(pid)
    ticks0 = proc_cpu_ticks(pid)
    ctx0 = int(st["voluntary_ctxt_switches"]) + int(st["nonvoluntary_ctxt_switches"])
    rss = []
    t_end = time.perf_counter() + idle_s
    while time.perf_counter() < t_end:
        time.sleep(min(1.0, max(0.0, t_end - time.perf_counter())))
        rss.append(int(proc_status(pid)["VmRSS"].split()[0]))
    st2 = proc_status(pid)
    ticks1 = proc_cpu_ticks(pid)
    ctx1 = int(st2["voluntary_ctxt_switches"]) + int(st2["nonvoluntary_ctxt_switches"])
    hz = os.sysconf("SC_CLK_TCK")
    d.stop()
    netns_del(ns)
    size = os.path.getsize(MASQD)
    res = {"ready_s": ready, "rss_kib": int(median(rss)), "rss_max_kib": max(rss),
           "hwm_kib": int(st2["VmHWM"].split()[0]),
           "idle_cpu_s": (ticks1 - ticks0) / hz, "idle_s": idle_s, "wakeups": ctx1 - ctx0,
           "binary_bytes": size}
    log(f"  footprint: {res}")
    return res


# --------------------------------------------------------------------------- report

def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    vers = {}
    for tool, args in (("nft", ["nft", "--version"]), ("iptables", ["iptables-legacy", "--version"]),
                       ("masqd", [MASQD, "--version"])):
        vers[tool] = run(args, check=False).stdout.decode().strip()
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem,
            "os": run(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]).stdout.decode().strip(), **vers}


def report_datapath(dp, dp_n, guard):
    L = []
    L.append("## 4. Datapath: new flows per second through the NAT hook\n")
    L.append("UDP probes from pod A, each to a new destination (a new conntrack entry, so every probe "
             "traverses node A's nat/postrouting hook and is masqueraded), counted as received by the "
             "outside host; conntrack flushed before each trial.\n")
    L.append("| policy | new flows/s | relative to 1 exception |")
    L.append("|---|---:|---:|")
    one_rate = dp["masqd, 1 exception"]
    for k, v in dp.items():
        L.append(f"| {k} | {v:,.0f} | {v / one_rate:.2f} |")
    rel = dp[f"masqd, {dp_n:,} exceptions (interval set)"] / one_rate
    L.append(f"\n**Target: with {dp_n:,} exceptions at least 0.9× the one-exception rate. Measured: "
             f"{rel:.2f}× — {'met' if rel >= 0.9 else 'MISSED'}.**\n")

    g = guard["res"]
    L.append("### The guard's cost\n")
    L.append("The same run, two more clusters built like the first, whose node A has no NAT chain but the "
             "one under test (the first one's node A keeps legacy `iptable_nat` and iptables-nft's `ip nat` "
             "chains registered: the guard's binding would skip them, `return` would not). Node A's nat "
             "chain is loaded with `nft -f` in two layouts with the same sets (`pod4` = the pod subnet, "
             "`nomasq4` = the exception set of the rows above) — "
             "**guard**, design.md §3.1: `table inet masqd` chain at `priority srcnat - 1` with "
             "`oifname \"docker0\" return`, `meta mark & 0x4000 == 0x4000 return`, "
             "`ip saddr @pod4 ip daddr @nomasq4 counter snat ip to ip saddr`, "
             "`ip saddr @pod4 counter masquerade`; **return**: the same at `priority srcnat`, no mark rule, "
             "`counter return` instead of the identity SNAT. Probes to an excepted destination "
             "(172.7.128.0/17, inside the exception 172.7.0.0/16, routed to the outside host) and to a "
             f"masqueraded one (10.201.0.0/16); {guard['flows']:,} new flows per variant and trial, conntrack "
             "flushed before each. One cluster holds guard, the other return, and they are measured "
             f"interleaved: {guard['chunks']} flowgen runs of {guard['chunk']:,} flows each (each from a new "
             "socket), one cluster then the other, then the other way round — the speed of this VM drifts "
             "by 10–30 % within seconds, the same for both. The variants swap clusters trial by trial, so a "
             "difference between the two clusters (about 1 % in an A/A run) cancels out. Each trial is checked: "
             "after each load the chain's priority and rules and the set's size are read back and no other "
             "NAT table exists; each flowgen run made one new conntrack entry on node A per probe (a run whose "
             "socket got an earlier run's source port is detected so, and the measurement repeated); after "
             "the probes, the rule that must see them (the exception rule, or the "
             "masquerade rule) counted exactly the probes sent and the other none, and the outside host "
             "received them from the pod's address (excepted) or node A's (masqueraded) and none from the "
             "other. guard / return is the median of the per-trial ratios; the range is theirs; flows/s "
             "are medians.\n")
    L.append("| exceptions N | destination | trials | guard flows/s | return flows/s | guard / return | per-trial range |")
    L.append("|---:|---|---:|---:|---:|---:|---|")
    for (s, k), r in g.items():
        L.append(f"| {s} | {k} | {r['trials']} | {r['guard']:,.0f} | {r['return']:,.0f} | {r['ratio']:.3f} | "
                 f"{r['paired_min']:.3f}–{r['paired_max']:.3f} |")
    ok = all(r["ratio"] >= 0.95 for r in g.values())
    measured = "; ".join(f"{k}, N = {s}: {r['ratio']:.3f}" for (s, k), r in g.items())
    few = min(r["trials"] for r in g.values())
    L.append(f"\n**Target: the guard must cost under 5 % (guard / return ≥ 0.95). Measured: {measured} — "
             f"{'MET' if ok else 'MISSED'}" + (f" (only {few} trials: a smoke run, not conclusive)" if few < 5 else "")
             + ".**\n")
    return L


def report_machine(m):
    return ["## Machine\n",
            f"- {m['os']}, kernel {m['kernel']}, {m['cores']} cores ({m['cpu']}), {m['mem_gib']:.0f} GiB",
            f"- {m['nft']}; {m['iptables']}; {m['masqd']}\n"]


def report(m, full, sizes, one, one_n, drift, dp, dp_n, guard, foot, foot_n, args, started, took):
    ms = lambda s: f"{s * 1000:.1f} ms"
    L = []
    L.append("# masqd benchmarks\n")
    L.append(f"Generated by `scripts/bench.py` on {started} in {took:.0f} s "
             f"({'quick' if args.quick else 'full'} run). Reproduce as root: `bash scripts/bench.sh`.\n")
    L.append("Every comparison runs side by side in one run on one machine, alternating between the "
             "tools, in private network namespaces; figures are medians. Every masqd apply is checked "
             "against the kernel (the set holds exactly the expected intervals and `masqd plan` has "
             "nothing to do), so nothing is fast by being wrong.\n")
    L += report_machine(m)

    L.append("## 1. Full apply from an empty node\n")
    L.append("N disjoint /28 exceptions (N intervals). `nft -f` loads the identical ruleset "
             "(`masqd export`), as knftables-based tools do; the iptables tools load the ip-masq-agent "
             "layout (one RETURN rule per CIDR). Wall, user and sys time (the kernel accounts CPU time in "
             "4 ms ticks here, so small user/sys figures are coarse), peak RSS (GNU time's %M); "
             "ratio = wall / `nft -f`. Wall includes starting the process under `/usr/bin/time`.\n")
    L.append("| N | tool | wall | user | sys | peak RSS | ratio to nft -f |")
    L.append("|---:|---|---:|---:|---:|---:|---:|")
    for n in sizes:
        base = full[(n, "nft -f")]["wall"]
        for t in ("masqd apply", "masqd apply (list file)", "nft -f", "iptables-legacy-restore",
                  "iptables-nft-restore"):
            r = full[(n, t)]
            L.append(f"| {n:,} | {t} | {ms(r['wall'])} | {ms(r['user'])} | {ms(r['sys'])} | "
                     f"{r['rss'] / 1024:.1f} MiB | {r['wall'] / base:.2f}× |")
    big = max(sizes)
    ratio = full[(big, "masqd apply")]["wall"] / full[(big, "nft -f")]["wall"]
    ratio_l = full[(big, "masqd apply (list file)")]["wall"] / full[(big, "nft -f")]["wall"]
    L.append(f"\n\"masqd apply\" reads the exceptions from the TOML array, \"(list file)\" from "
             f"`nonmasquerade_cidrs_file`. **Target: full apply of 60,000 at most 0.5× `nft -f`. "
             f"Measured (N={big:,}): {ratio:.2f}× with the TOML array "
             f"({'met' if ratio <= 0.5 else 'MISSED'}), {ratio_l:.2f}× with a list file "
             f"({'met' if ratio_l <= 0.5 else 'MISSED'}).**\n")

    L.append(f"## 2. One CIDR added to / removed from a {one_n:,}-interval set\n")
    L.append("| how | median | ratio to masqd run |")
    L.append("|---|---:|---:|")
    dkeys = [k for k in one if k.startswith("masqd run")]
    drun = min(one[k]["wall"] for k in dkeys)
    for k, v in one.items():
        L.append(f"| {k} | {v['wall'] * 1000:.2f} ms | {v['wall'] / drun:.0f}× |")
    L.append("\nThe daemon's figures are the time from `rename(2)` of the file (the config, or the "
             "CIDR list file it names) to the kernel's NEWSETELEM/DELSETELEM notification, seen on an "
             "NFNLGRP_NFTABLES socket; p99: " + ", ".join(f"{k}: {ms(one[k]['p99'])}" for k in dkeys) +
             ". SIGHUP takes the same path (re-read, plan, one transaction).\n")
    L.append(f"**Target: under 5 ms through the daemon. Measured: {ms(drun)} — "
             f"{'met' if drun < 0.005 else 'MISSED'}.**\n")

    L.append("## 3. Drift repair by the daemon\n")
    L.append("The table is deleted (one netlink batch, as `nft delete table inet masqd` sends) while "
             "`masqd run` watches; from the kernel's acknowledgement of the deletion to masqd's `STATUS=` "
             "notification, which it sends right after its restoring transaction was acknowledged (so "
             "the figure slightly over-states the repair). One deletion every 0.55 s, below the rate "
             "limit for a writer that keeps deleting the table (20 repairs in 10 s).\n")
    L.append("| exceptions | trials | p50 | p99 |")
    L.append("|---:|---:|---:|---:|")
    for n, r in drift.items():
        L.append(f"| {n:,} | {r['trials']} | {ms(r['p50'])} | {ms(r['p99'])} |")
    worst = max(r["p99"] for r in drift.values())
    L.append(f"\n**Target: p99 under 50 ms.** " + "; ".join(
        f"N={n:,}: {ms(r['p99'])} ({'met' if r['p99'] < 0.05 else 'MISSED'})" for n, r in drift.items()) + "\n")

    L += report_datapath(dp, dp_n, guard)
    L.append(f"## 5. The daemon's footprint with {foot_n:,} exceptions\n")
    L.append("| figure | value | target |")
    L.append("|---|---:|---|")
    L.append(f"| start to READY=1 | {ms(foot['ready_s'])} | |")
    L.append(f"| RSS while idle (median of one sample a second) | {foot['rss_kib'] / 1024:.1f} MiB | under 16 MiB: "
             f"{'met' if foot['rss_kib'] < 16 * 1024 else 'MISSED'} |")
    L.append(f"| RSS, highest sample while idle / peak (VmHWM, start-up) | {foot['rss_max_kib'] / 1024:.1f} MiB / "
             f"{foot['hwm_kib'] / 1024:.1f} MiB | (a resync reconcile every 60 s allocates for a moment; "
             f"freed memory is returned a second later) |")
    L.append(f"| CPU over {foot['idle_s']:.0f} s idle | {foot['idle_cpu_s'] * 1000:.0f} ms "
             f"({foot['wakeups']} context switches) | none beyond the watchdog: "
             f"{'met' if foot['idle_cpu_s'] <= 0.02 else 'MISSED'} |")
    L.append(f"| binary size | {foot['binary_bytes'] / 2**20:.1f} MiB | |")
    L.append("")
    return "\n".join(L) + "\n"


def follow_reports(sc, ch, oc, rl, lc):
    """Sections 7-11 of the report (bench_scale.py, bench_follow.py); those not run are left out."""
    return [*report_scaling(sc), *report_churn(ch), *report_one_cidr_scale(oc), *report_repair_load(rl),
            *report_listen_cost(lc)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes, runs and trials (a smoke run)")
    ap.add_argument("--out", help="the report (default BENCHMARKS.md; with --only, standard output)")
    ap.add_argument("--notes", default=os.path.join(ROOT, "scripts", "bench-notes.md"),
                    help="hand-written analysis appended to the report")
    ap.add_argument("--only", choices=ONLY,
                    help="run one section and write only its part of the report (never BENCHMARKS.md "
                         "unless --out names it)")
    ap.add_argument("--sizes", help="comma list of exception counts for sections 7-9 instead of "
                                    "1,000 … 1,000,000 (e.g. 1000,10000 for a smoke run)")
    args = ap.parse_args()
    try:
        given = sorted({int(x.replace("_", "")) for x in args.sizes.split(",")}) if args.sizes else None
    except ValueError:
        sys.exit(f"--sizes: {args.sizes!r} is not a comma list of numbers")
    if given and min(given) < 1:
        sys.exit(f"--sizes: {args.sizes!r}: every size must be at least 1")
    if os.geteuid() != 0:
        sys.exit("bench.py must run as root (network namespaces)")
    for p in (MASQD, FLOWGEN):
        if not os.access(p, os.X_OK):
            sys.exit(f"{p} missing: cargo build --release --example flowgen")
    sizes = [1000, 10000] if args.quick else [1000, 10000, 60000]
    runs = 3 if args.quick else 9
    big = max(sizes)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="masqd-bench-")

    def section(name, fn, *a):
        if args.only and args.only != name.split(". ", 1)[1]:
            return None
        log(name)
        ts = time.time()
        r = fn(*a)
        log(f"  ({name}: {time.time() - ts:.0f} s)")
        return r

    try:
        m = machine()
        full = section("1. full apply", bench_full_apply, sizes, runs, tmp)
        one = section("2. one CIDR", bench_one_cidr, big, runs, 10 if args.quick else 40, tmp)
        drift = section("3. drift", bench_drift, [1, 1000, big], 10 if args.quick else 50, tmp)
        dp, guard = section("4. datapath", bench_datapath, big, 20000 if args.quick else 100000,
                            2 if args.quick else 5, 2000 if args.quick else 5000, 2 if args.quick else 10,
                            tmp) or (None, None)
        foot = section("5. footprint", bench_footprint, big, 10 if args.quick else 60, tmp)
        ld = section("6. legacy drift", bench_legacy_drift, 10, 10 if args.quick else 60, tmp)
        scale_sizes = given or ([1000, 10000] if args.quick else SCALE_SIZES)
        sc = section("7. scaling", bench_scaling, scale_sizes, 3 if args.quick else 5, 1 if args.quick else 3,
                     args.quick, tmp)
        churn_sizes = sorted({1, *given}) if given else ([1, 10000] if args.quick else [1, 60000, 1000000])
        ch = section("8. foreign churn", bench_churn, churn_sizes, 40 if args.quick else 100, 10.0, tmp)
        oc = section("9. one CIDR at scale", bench_one_cidr_scale,
                     given or ([1000, 10000] if args.quick else [1000, 60000, 1000000]), 10 if args.quick else 40, tmp)
        rl = section("10. repair under commits", bench_repair_load, 1000, 25000, 25.0, 20, tmp)
        lc = section("11. listening cost", bench_listen_cost, 1000, 25000, 2 if args.quick else 5, tmp)
    finally:
        for p in DAEMONS:
            p.kill()
            p.wait()
        for ns in list(NAMESPACES):
            netns_del(ns)
        run(["bash", CLUSTER, "down", "mqbd"], check=False)
        run(["bash", CLUSTER, "down", "mqbg"], check=False)
        run(["bash", CLUSTER, "down", "mqbh"], check=False)
    if args.only:
        text = "\n".join([f"# masqd benchmarks: section {args.only} only\n",
                          f"Generated by `scripts/bench.py --only {args.only}{' --quick' if args.quick else ''}` "
                          f"on {started} in {time.time() - t0:.0f} s.\n", *report_machine(m),
                          *(report_datapath(dp, big, guard) if dp else []),
                          *report_legacy_drift(ld), *follow_reports(sc, ch, oc, rl, lc)]) + "\n"
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
            log(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
        return
    text = report(m, full, sizes, one, big, drift, dp, big, guard, foot, big, args, started, time.time() - t0)
    text += "\n".join(report_legacy_drift(ld)) + "\n"
    text += "\n".join(follow_reports(sc, ch, oc, rl, lc)) + "\n"
    if os.path.exists(args.notes):
        with open(args.notes) as f:
            text += "\n" + f.read()
    out = args.out or os.path.join(ROOT, "BENCHMARKS.md")
    with open(out, "w") as f:
        f.write(text)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
