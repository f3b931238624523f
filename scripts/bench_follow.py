"""Sections 8-11 of the benchmarks: what following the nftables event stream costs and buys —
foreign churn (masqd CPU per 100 foreign changes, RSS), one CIDR through the daemon at
1,000 to 1,000,000 exceptions, repair latency while others commit, and what masqd's listening
costs other writers. Used by scripts/bench.py (`--only churn`, `--only "one CIDR at scale"`,
`--only "repair under commits"`, `--only "listening cost"`)."""

import os
import tempfile
import time

from bench_common import (LIMIT, NFPROTO_INET, NFT_MSG_NEWGEN, NFT_MSG_NEWRULE, NFT_MSG_NEWTABLE, Batches, Churn,
                          Daemon, cidrs, cpu_s, daemon_one_cidr, delete_table, events, in_ns, kube_ruleset,
                          log, median, metric_sum, monitor_socket, netns, netns_del, ns_socket, pct,
                          rule_count, run, scrape, set_size, summary, timed, vm_rss_kib, write_config)

MASQD_RULES = 4  # rules in masqd's postrouting chain for one family (bridge, mark, guard, masquerade)
MISS_S = 10.0  # section 10: a repair not seen within this is reported as "> 10 s"
STALL_S = 20.0  # … and after this much more without it, the remaining deletions are not made


def daemon_at(ns, n, d_dir, extra=""):
    """`masqd run` with n exceptions (a list file) and metrics on a unix socket; READY waited."""
    sock = os.path.join(d_dir, "metrics.sock")
    cfg = os.path.join(d_dir, "masqd.toml")
    write_config(cfg, cidrs(n), list_file=os.path.join(d_dir, "nonmasq.list"),
                 extra=f'[metrics]\nlisten = "{sock}"\n{extra}')
    d = Daemon(ns, cfg, os.path.join(d_dir, "state"))
    d.wait("READY=1", timeout=600)
    return d, sock


def repaired(d, mon, undo, table_too=True, timeout=20, may_miss=False):
    """Runs `undo` (a foreign change to masqd's objects that returns the time the kernel
    acknowledged it) and returns the seconds from then to the end (NEWGEN) of the transaction
    whose notifications, all from one socket — masqd's, brought its rules back (NEWRULE ×
    MASQD_RULES, after NEWTABLE when `table_too`); then waits for masqd's STATUS= of the repair.
    No repair within `timeout`: None when `may_miss`, else an error."""
    before = d.repairs()
    t_del = undo()
    pid, rules, t_done = None, 0, None
    for t, typ, p, table in events(mon, t_del + timeout):
        if table == "masqd" and ((typ == NFT_MSG_NEWTABLE) if table_too else
                                 (typ == NFT_MSG_NEWRULE and pid is None)):
            pid, rules = p, 0
        if typ == NFT_MSG_NEWRULE and table == "masqd" and p == pid:
            rules += 1
        elif typ == NFT_MSG_NEWGEN and pid is not None and rules >= MASQD_RULES:
            t_done = t
            break
    if t_done is None:
        if may_miss:
            return None
        raise RuntimeError(f"masqd's rules not back ({MASQD_RULES}) within {timeout} s")
    d.wait_repairs(before + 1, timeout=timeout)
    return t_done - t_del


# --------------------------------------------------------------------------- 8. foreign churn

def settled_rss(pid, limit=15.0):
    """VmRSS once it stopped moving (two samples 0.5 s apart within 64 KiB, at least 1.5 s after
    READY: the daemon trims freed memory a second after a reconcile), at most `limit` s."""
    time.sleep(1.5)
    last, t_end = vm_rss_kib(pid), time.perf_counter() + limit
    while time.perf_counter() < t_end:
        time.sleep(0.5)
        now = vm_rss_kib(pid)
        if abs(now - last) <= 64:
            return now
        last = now
    return last

def churn_one(n, changes, rate, tmp):
    ns = netns(f"mqb-churn-{n}")
    run(in_ns(ns, "nft", "add table ip nat; add chain ip nat KUBE-BENCH-CHURN"))
    d_dir = tempfile.mkdtemp(prefix=f"churn-{n}-", dir=tmp)
    d, sock = daemon_at(ns, n, d_dir)
    pid = d.proc.pid
    try:
        rss0 = settled_rss(pid)  # the idle figure: after the trim that follows the start-up reconcile
        m0, (u0, s0) = scrape(sock), cpu_s(pid)
        w = Churn(ns, rate, count=changes).start().join()
        u1, s1 = cpu_s(pid)
        m1, rss1 = scrape(sock), vm_rss_kib(pid)
        time.sleep(1.2)
        rss2 = vm_rss_kib(pid)
        # Still following: masqd's chain flushed by someone else is repaired (a rules-only
        # repair, cheap at any N).
        b, mon = Batches(ns), monitor_socket(ns)
        rep = repaired(d, mon, lambda: b.flush_chain("masqd", "postrouting", family=NFPROTO_INET),
                       table_too=False, timeout=60)
        b.close()
        mon.close()
    finally:
        d.stop()
        netns_del(ns)
    per100 = 100 / w["commits"]
    out = {"n": n, "commits": w["commits"], "seconds": w["seconds"], "late": w["late"],
           "user": (u1 - u0) * per100, "sys": (s1 - s0) * per100, "rss0": rss0, "rss1": rss1, "rss2": rss2,
           "dumps": metric_sum(m1, "masqd_netlink_dumps_total") - metric_sum(m0, "masqd_netlink_dumps_total"),
           "syncs": metric_sum(m1, "masqd_sync_duration_seconds_count")
           - metric_sum(m0, "masqd_sync_duration_seconds_count"), "metrics": bool(m0), "repair": rep}
    log(f"  churn N={n}: {out['user'] + out['sys']:.3f} s CPU per 100 changes, RSS {rss0} → {rss2} KiB, "
        f"{out['dumps']:.0f} dumps, repair after {rep * 1000:.1f} ms")
    return out


def bench_churn(sizes, changes, rate, tmp):
    """8. A kube-proxy-like writer adds and flushes one rule in its own chain of `table ip nat`
    (`changes` commits at `rate` a second, each its own netlink transaction) while `masqd run`
    with n exceptions watches: masqd's CPU per 100 changes, its RSS, its dumps and reconciles."""
    return {"rows": [churn_one(n, changes, rate, tmp) for n in sizes], "changes": changes, "rate": rate}


def report_churn(ch):
    if not ch:
        return []
    L = ["## 8. Foreign churn: what another writer's commits cost masqd\n",
         f"A kube-proxy-like writer adds one rule to its own chain of `table ip nat`, then flushes the "
         f"chain, {ch['rate']:.0f} commits a second (each its own transaction, sent on a netlink socket so "
         f"that the writer is never the bottleneck), {ch['changes']} commits, while `masqd run` "
         "(exceptions in a list file) watches. masqd's CPU time is read from /proc/PID/stat before and after "
         "(10 ms ticks), per 100 foreign changes. RSS (VmRSS) once settled after start-up (the idle "
         "figure: two samples 0.5 s apart within 64 KiB), right after the "
         "churn, and 1.2 s later; dumps and reconciles from masqd's metrics over the churn. Afterwards "
         "masqd's chain is flushed (as a foreign writer) and the time to its repair measured, so the "
         "figures cannot come from a daemon that stopped following.\n",
         "| exceptions | commits (s) | CPU per 100 changes | user | sys | RSS before | right after | 1.2 s later | "
         "dumps | reconciles | then its flushed chain repaired in |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ch["rows"]:
        mt = (lambda v: f"{v:.0f}") if r["metrics"] else (lambda v: "?")
        L.append(f"| {r['n']:,} | {r['commits']} ({r['seconds']:.1f} s) | {r['user'] + r['sys']:.3f} s | "
                 f"{r['user']:.3f} s | {r['sys']:.3f} s | {r['rss0'] / 1024:.1f} MiB | {r['rss1'] / 1024:.1f} MiB | "
                 f"{r['rss2'] / 1024:.1f} MiB | {mt(r['dumps'])} | {mt(r['syncs'])} | {r['repair'] * 1000:.1f} ms |")
    L.append("\n**Targets** (at most 0.05 s of masqd CPU per 100 foreign changes, RSS within 1 MiB of the idle "
             "figure, at 60,000 and at 1,000,000):\n")
    for big in (60000, 1000000):
        r = next((x for x in ch["rows"] if x["n"] == big), None)
        if r is None:
            L.append(f"- N={big:,}: not measured in this run.")
            continue
        cpu, grow = r["user"] + r["sys"], (max(r["rss1"], r["rss2"]) - r["rss0"]) / 1024
        L.append(f"- N={big:,}: {cpu:.3f} s per 100 changes — **{'met' if cpu <= 0.05 else 'MISSED'}**; RSS "
                 f"{r['rss0'] / 1024:.1f} → {max(r['rss1'], r['rss2']) / 1024:.1f} MiB ({grow:+.2f} MiB) — "
                 f"**{'met' if grow <= 1 else 'MISSED'}**.")
    L.append("")
    return L


# --------------------------------------------------------------------------- 9. one CIDR at scale

def bench_one_cidr_scale(sizes, trials, tmp):
    """9. One CIDR added / removed through the daemon at each size: rename(2) of the list file or
    of the TOML → the kernel's set-element notification (section 2's `daemon_one_cidr`)."""
    res = {}
    # Outside every size's exceptions (1,000,000 of them reach 12.255.255.224).
    extra = cidrs(1, base=0x0A000000)
    for n in sizes:
        ex = cidrs(n)
        for kind in ("list file", "TOML array"):
            r = daemon_one_cidr(n, ex, extra, trials, tmp, kind, timeout=5.0 if n <= 60000 else LIMIT,
                                may_miss=True)
            r["limit"] = 5.0 if n <= 60000 else LIMIT
            res[(n, kind)] = r
            log(f"  one CIDR N={n}, {kind}: median {r['wall'] * 1000:.2f} ms, p99 {r['p99'] * 1000:.2f} ms")
    return {"res": res, "sizes": sizes, "trials": trials}


def fig(x, r):
    """A latency of section 9: "> limit" for a rename the daemon had not applied by then."""
    return f"> {r['limit']:.0f} s (not applied)" if x == float("inf") else f"{x * 1000:.2f} ms"


def report_one_cidr_scale(oc):
    if not oc:
        return []
    res = oc["res"]
    L = ["## 9. One CIDR through the daemon, 1,000 to 1,000,000 exceptions\n",
         f"As section 2, at each size: {oc['trials']} renames per row, alternately adding and removing one "
         "CIDR; from `rename(2)` of the file (the CIDR list file, or masqd.toml with the TOML array) to "
         "the kernel's NEWSETELEM/DELSETELEM notification on an NFNLGRP_NFTABLES socket. At the "
         "end of each row the set is checked against the kernel: its size (`nft list set`), above 250,000 "
         "the changed CIDR and the last one looked up by key (a dump there costs minutes). A rename not "
         "applied within 5 s (above 60,000: 120 s) is shown as such and ends its row.\n",
         "| exceptions | exceptions in | renames | median | p99 |", "|---:|---|---:|---:|---:|"]
    for (n, kind), r in res.items():
        L.append(f"| {n:,} | {kind} | {r['trials']} | {fig(r['wall'], r)} | {fig(r['p99'], r)} |")
    L.append("\n**Targets** (list file: at 60,000 median under 3 ms and p99 under 10 ms; at 1,000,000 median "
             "under 5 ms):\n")
    ok = lambda good: "met" if good else "MISSED"
    r = res.get((60000, "list file"))
    L.append("- N=60,000: " + (f"median {fig(r['wall'], r)} — **{ok(r['wall'] < 0.003)}**; "
                               f"p99 {fig(r['p99'], r)} — **{ok(r['p99'] < 0.010)}**."
                               if r else "not measured in this run."))
    r = res.get((1000000, "list file"))
    L.append("- N=1,000,000: " + (f"median {fig(r['wall'], r)} — **{ok(r['wall'] < 0.005)}**."
                                  if r else "not measured in this run."))
    L.append("")
    return L


# --------------------------------------------------------------------------- 10. repair under commits

def bench_repair_load(n, foreign, rate, trials, tmp):
    """10. `foreign` kube-proxy-like rules in `table ip nat` and a writer committing `rate` times a
    second in it while `masqd run` (n exceptions) watches; `table inet masqd` deleted `trials`
    times (0.55 s apart: under the 20-in-10-s limit), each repair timed from the kernel's
    notifications (`repaired`)."""
    ns = netns("mqb-repair")
    rules = os.path.join(tmp, f"kube-{foreign}.nft")
    with open(rules, "w") as f:
        f.write(kube_ruleset(foreign))
    run(in_ns(ns, "nft", "-f", rules))
    d_dir = tempfile.mkdtemp(prefix="repair-", dir=tmp)
    d, _ = daemon_at(ns, n, d_dir)
    deleter, mon = ns_socket(ns), monitor_socket(ns)
    lat, stalled = [], None
    try:
        time.sleep(1.5)
        w = Churn(ns, rate).start()
        try:
            for i in range(trials):
                time.sleep(0.55)
                before = d.repairs()
                x = repaired(d, mon, lambda: delete_table(deleter), timeout=MISS_S, may_miss=True)
                if x is None:
                    # Not repaired while the writer commits: the figure is "> MISS_S"; wait a while
                    # longer for the table before the next deletion, else stop here.
                    lat.append(float("inf"))
                    try:
                        stalled = {"trial": i + 1, "after": d.wait_repairs(before + 1, timeout=STALL_S) - d.t0}
                    except RuntimeError:
                        stalled = {"trial": i + 1, "after": None}
                        break
                else:
                    lat.append(x)
        finally:
            wr = w.stop()
        run(in_ns(ns, "nft", "flush", "chain", "ip", "nat", "KUBE-BENCH-CHURN"))
        if stalled and stalled["after"] is None:
            d.wait_repairs(d.repairs() + 1, timeout=60)  # the writer stopped: the repair must come now
        got = rule_count(ns, "inet", "masqd")
        if got != MASQD_RULES or set_size(ns) != n or rule_count(ns, "ip", "nat") != foreign:
            raise RuntimeError(f"after the repairs: {got} rules in inet masqd, {set_size(ns)} intervals")
    finally:
        deleter.close()
        mon.close()
        d.stop()
        netns_del(ns)
    res = {"n": n, "foreign": foreign, "rate": rate, "achieved": wr["commits"] / wr["seconds"], "trials": trials,
           "lat": lat, "p50": pct(lat, 50), "p99": pct(lat, 99), "worst": max(lat), "stalled": stalled}
    log(f"  repair under commits: p50 {res['p50'] * 1000:.1f} ms, p99 {res['p99'] * 1000:.1f} ms, "
        f"worst {res['worst'] * 1000:.1f} ms ({res['achieved']:.1f} foreign commits/s)")
    return res


def report_repair_load(rl):
    if not rl:
        return []
    ms = lambda s: f"> {MISS_S:.0f} s (not repaired)" if s == float("inf") else f"{s * 1000:.1f} ms"
    L = ["## 10. Repair while others commit\n",
         f"{rl['foreign']:,} foreign rules in kube-proxy-like chains of `table ip nat` (KUBE-SERVICES → "
         "KUBE-SVC-* → KUBE-SEP-*, KUBE-POSTROUTING's mark masquerade, three base chains), loaded with "
         f"`nft -f`; another writer adds and flushes a rule in its own chain there, {rl['rate']:.0f} commits "
         f"a second (measured: {rl['achieved']:.1f}/s); `masqd run` with {rl['n']:,} exceptions. "
         f"`table inet masqd` is deleted up to {rl['trials']} times, 0.55 s after each repair (one netlink "
         "batch, as `nft delete table inet masqd` sends); each figure is from the kernel's acknowledgement "
         "of the deletion to the end of the transaction in which masqd's socket brought the table back "
         f"with its {MASQD_RULES} rules (NEWTABLE, NEWRULE ×{MASQD_RULES}, NEWGEN on an NFNLGRP_NFTABLES "
         f"socket). A repair not seen within {MISS_S:.0f} s counts as \"> {MISS_S:.0f} s\"; when it has not "
         f"come {STALL_S:.0f} s later either, no more deletions are made. At the end (the writer stopped) "
         "masqd's table, its set and the foreign rules are counted in the kernel.\n",
         "| deletions | repaired within the limit | median | p99 | worst |", "|---:|---:|---:|---:|---:|",
         f"| {len(rl['lat'])} of {rl['trials']} | {sum(1 for x in rl['lat'] if x != float('inf'))} | "
         f"{ms(rl['p50'])} | {ms(rl['p99'])} | {ms(rl['worst'])} |"]
    st = rl["stalled"]
    if st:
        L.append(f"\nDeletion {st['trial']} was not repaired within {MISS_S:.0f} s while the writer committed"
                 + (f"; the repair came {st['after']:.1f} s after the daemon's start." if st["after"] is not None
                    else f", nor {STALL_S:.0f} s later: the remaining deletions were not made (the repair came "
                         "once the writer stopped)."))
    L.append(f"\n**Target: p99 within 50 ms. Measured: {ms(rl['p99'])} — "
             f"{'met' if rl['p99'] <= 0.05 and len(rl['lat']) == rl['trials'] else 'MISSED'}.**\n")
    return L


# --------------------------------------------------------------------------- 11. listening cost

def bench_listen_cost(n, foreign, runs, tmp):
    """11. A `foreign`-rule `nft -f` (kube_ruleset) into one netns, timed with `masqd run` (n
    exceptions) running there and without it (stopped: its table stays), alternating; the table
    ip nat deleted (untimed) before each load; masqd's CPU over each load with it running."""
    ns = netns("mqb-listen")
    rules = os.path.join(tmp, f"kube-{foreign}.nft")
    with open(rules, "w") as f:
        f.write(kube_ruleset(foreign))
    d_dir = tempfile.mkdtemp(prefix="listen-", dir=tmp)
    s = {"with masqd run": [], "without": []}
    masqd_cpu = []
    try:
        for r in range(2 * runs):
            with_d = (r % 2 == 0) == ((r // 2) % 2 == 0)  # with, without, without, with, …
            run(in_ns(ns, "nft", "delete", "table", "ip", "nat"), check=False)
            d = None
            if with_d:
                d, _ = daemon_at(ns, n, d_dir)
                time.sleep(1.2)
                c0 = sum(cpu_s(d.proc.pid))
            x = timed(in_ns(ns, "nft", "-f", rules))
            if x.get("failed") or x["stopped"]:
                raise RuntimeError(f"nft -f of {foreign} rules: exit {x['rc']}: {x['err']}")
            if d:
                time.sleep(1.0)  # masqd's reaction to the load, counted below
                masqd_cpu.append(sum(cpu_s(d.proc.pid)) - c0)
                d.stop()
            s["with masqd run" if with_d else "without"].append(x)
        if rule_count(ns, "ip", "nat") != foreign:
            raise RuntimeError("the foreign rules are not all in the kernel")
    finally:
        netns_del(ns)
    res = {k: summary(v) for k, v in s.items()}
    res["masqd_cpu"] = median(masqd_cpu)
    res["foreign"], res["n"] = foreign, n
    log(f"  listening cost: nft -f with masqd {res['with masqd run']['wall'] * 1000:.0f} ms, "
        f"without {res['without']['wall'] * 1000:.0f} ms; masqd CPU {res['masqd_cpu'] * 1000:.0f} ms")
    return res


def report_listen_cost(lc):
    if not lc:
        return []
    ms = lambda s: f"{s * 1000:.1f} ms"
    L = ["## 11. What masqd's listening costs other writers\n",
         f"A {lc['foreign']:,}-rule `nft -f` of section 10's kube-proxy-like `table ip nat` into one netns, "
         f"with `masqd run` ({lc['n']:,} exceptions) running beside it and without it (stopped; its table "
         "stays), alternating (with, without, without, with, …); the table deleted before each load, "
         "untimed. While masqd listens the kernel builds a notification of every new chain and rule for its "
         "socket, and masqd reads them. Medians, spread min–max; masqd's own CPU over each load (and "
         "one second after it) is its median.\n",
         "| nft -f of the rules | wall | spread (runs) | user | sys |", "|---|---:|---|---:|---:|"]
    for k in ("without", "with masqd run"):
        r = lc[k]
        L.append(f"| {k} | {ms(r['wall'])} | {ms(r['min'])}–{ms(r['max'])} ({r['n']}) | {ms(r['user'])} | "
                 f"{ms(r['sys'])} |")
    ratio = lc["with masqd run"]["wall"] / lc["without"]["wall"]
    L.append(f"\nWith masqd / without: {ratio:.2f}×; masqd's CPU per load: {ms(lc['masqd_cpu'])}.\n")
    return L
