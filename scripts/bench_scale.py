"""Section 7 of the benchmarks: the scaling table, 1,000 to 1,000,000 exceptions, masqd against
the anchors (`nft -f`, `nft list set`, `iptables-legacy-restore`, `iptables-nft-restore`), with
the kernel's share (sys time) of each; and the daemon at each size: start-up onto the existing
set, and the CPU time of one resync tick. Used by scripts/bench.py (`--only scaling`)."""

import os
import re
import time

from bench_common import (LIMIT, MASQD, Daemon, cidrs, cpu_s, has_element, in_ns, ipmasq_payload, log, metric_sum,
                          netns, netns_del, run, scrape, summary, timed, write_config)

RESYNC_S = 2.0
STATUS_VIA_DAEMON = "masqd status (answered by the running daemon)"


def count_elements(text):
    """Intervals in `nft list set` output: the items of its `elements = { … }` block."""
    m = re.search(r"elements = \{(.*?)\}", text.decode(), re.S)
    return 0 if not m else len([x for x in m.group(1).split(",") if x.strip()])


def status_asks_daemon():
    """Whether this masqd's `status` can ask a running daemon (item 4's control socket): its help
    text says so. Without it the slot in the table stays marked as not measured."""
    h = run([MASQD, "status", "--help"], check=False).stdout.decode().lower()
    return "control socket" in h or "running daemon" in h


class Tools:
    """The tools of one size, each in its own netns; a tool stopped at the limit is not run again
    (at this size or a larger one: `gone` is shared across sizes)."""

    def __init__(self, n, tmp, gone):
        self.n, self.tmp, self.gone = n, tmp, gone
        self.samples = {}
        ex = cidrs(n)
        self.extra = cidrs(1, base=0x0C000000)[0]
        self.cfg = os.path.join(tmp, f"scale-{n}.toml")
        self.cfg1 = os.path.join(tmp, f"scale-{n}-plus1.toml")
        write_config(self.cfg, ex)
        write_config(self.cfg1, ex + [self.extra])
        self.state = os.path.join(tmp, f"state-scale-{n}")
        self.nft_file = os.path.join(tmp, f"scale-{n}.nft")
        with open(self.nft_file, "wb") as f:
            f.write(run([MASQD, "--config", self.cfg, "export"]).stdout)
        # What a knftables-style tool sends for one changed CIDR: the whole set again.
        self.nft_refill = os.path.join(tmp, f"scale-{n}-refill.nft")
        with open(self.nft_refill, "w") as f:
            f.write("flush set inet masqd nomasq4\n")
            f.write("add element inet masqd nomasq4 { " + ", ".join(ex + [self.extra]) + " }\n")
        self.payload = ipmasq_payload(ex)
        self.ns = {t: netns(f"mqb-scale-{t}-{n}") for t in ("masqd", "nft", "legacy", "iptnft")}

    def record(self, key, r):
        if r.get("failed"):
            raise RuntimeError(f"N={self.n}, {key}: exit {r['rc']}: {r['err']}")
        self.samples.setdefault(key, []).append(r)
        if r["wall"] >= 1 and not r["stopped"]:  # progress of the long runs
            log(f"  N={self.n}: {key[1]} ({key[0]}) {r['wall']:.2f} s (user {r['user']:.2f}, sys {r['sys']:.2f})")
        if r["stopped"]:
            self.gone.add(key)
            log(f"  N={self.n}: {key[1]} ({key[0]}) stopped after {LIMIT:.0f} s")
        return not r["stopped"]

    def live(self, key):
        return key not in self.gone

    def masqd(self):
        ns, n = self.ns["masqd"], self.n
        run(in_ns(ns, "nft", "delete", "table", "inet", "masqd"), check=False)
        k = ("full apply", "masqd apply")
        if not self.live(k) or not self.record(k, timed(in_ns(ns, MASQD, "--config", self.cfg,
                                                              "--state-dir", self.state, "apply"))):
            return
        # `nft list set` on masqd's set: the anchor of reading back, and the check of the apply.
        k = ("read back", "nft list set")
        r = timed(in_ns(ns, "nft", "list", "set", "inet", "masqd", "nomasq4"), capture=True) \
            if self.live(k) else None
        if r is not None and self.record(k, r):
            if count_elements(r["out"]) != n:
                raise RuntimeError(f"N={n}: masqd apply left {count_elements(r['out'])} intervals, not {n}")
        else:  # `nft list set` was stopped: look up every 1,000th CIDR and the last one by key
            ex = cidrs(n)
            missing = [c for c in ex[::1000] + ex[-1:] if not has_element(ns, c.split("/")[0])]
            if missing:
                raise RuntimeError(f"N={n}: masqd apply left out {missing[:3]}")
        k = ("onto existing", "masqd apply")
        onto = self.live(k) and self.record(k, timed(in_ns(ns, MASQD, "--config", self.cfg1, "--state-dir",
                                                           self.state, "apply")))
        # One element looked up by key (one GETSETELEM): did the changed CIDR arrive?
        if onto and not has_element(ns, self.extra.split("/")[0]):
            raise RuntimeError(f"N={n}: masqd apply onto the set did not add {self.extra}")
        k = ("read back", "masqd status (direct)")
        if self.live(k):
            r = timed(in_ns(ns, MASQD, "--config", self.cfg1 if onto else self.cfg, "--state-dir", self.state,
                            "status", "--json"), capture=True)
            if r["rc"] not in (0, None) and not r["stopped"]:
                raise RuntimeError(f"N={n}: masqd status says out of sync (exit {r['rc']}) after apply")
            r.pop("failed", None)
            self.record(k, r)

    def nft(self):
        ns = self.ns["nft"]
        run(in_ns(ns, "nft", "flush", "ruleset"))
        k = ("full apply", "nft -f")
        if self.live(k) and self.record(k, timed(in_ns(ns, "nft", "-f", self.nft_file))):
            k = ("onto existing", "nft -f (flush set + all elements)")
            if self.live(k):
                self.record(k, timed(in_ns(ns, "nft", "-f", self.nft_refill)))

    def iptables(self, tool, ns_key):
        ns = self.ns[ns_key]
        if ns_key == "legacy":
            run(in_ns(ns, "iptables-legacy", "-t", "nat", "-F"), check=False)
            run(in_ns(ns, "iptables-legacy", "-t", "nat", "-X"), check=False)
        else:
            run(in_ns(ns, "nft", "flush", "ruleset"))
        k = ("full apply", tool)
        if self.live(k):
            self.record(k, timed(in_ns(ns, tool), input=self.payload))

    def close(self):
        for name in self.ns.values():
            netns_del(name)


def daemon_tick(t, quick):
    """`masqd run` onto the set `Tools.masqd` left (N + 1 intervals, or N where the apply onto the
    set was stopped): start → READY=1, then the
    CPU time over a few resync ticks (resync_interval = 2 s), per tick; the metrics' reconcile
    and dump counters over the same window; and, where `status` can ask the daemon, its time."""
    ns, n = t.ns["masqd"], t.n
    sock = os.path.join(t.tmp, f"metrics-scale-{n}.sock")
    cfg = os.path.join(t.tmp, f"scale-{n}-daemon.toml")
    with open(t.cfg1) as f, open(cfg, "w") as g:
        g.write(f.read() + f'[daemon]\nresync_interval = "{RESYNC_S:.0f}s"\n[metrics]\nlisten = "{sock}"\n')
    d = Daemon(ns, cfg, t.state)
    out = {}
    try:
        try:
            out["ready"] = d.wait("READY=1", timeout=LIMIT) - d.t0
        except RuntimeError:  # stopped at the limit, like the one-shot tools
            d.proc.kill()
            return {"ready": None}
        time.sleep(1.5)  # the trim a second after the start-up reconcile
        ticks = 3 if quick else 5
        m0, (u0, s0), w0 = scrape(sock), cpu_s(d.proc.pid), time.perf_counter()
        time.sleep(ticks * RESYNC_S)
        m1, (u1, s1), w1 = scrape(sock), cpu_s(d.proc.pid), time.perf_counter()
        per = (w1 - w0) / RESYNC_S
        out.update(user=(u1 - u0) / per, sys=(s1 - s0) / per, ticks=per,
                   syncs=metric_sum(m1, "masqd_sync_duration_seconds_count")
                   - metric_sum(m0, "masqd_sync_duration_seconds_count"),
                   dumps=metric_sum(m1, "masqd_netlink_dumps_total") - metric_sum(m0, "masqd_netlink_dumps_total"),
                   metrics=bool(m0))
        if status_asks_daemon():
            r = [timed(in_ns(ns, MASQD, "--config", cfg, "--state-dir", t.state, "status", "--json"))
                 for _ in range(3)]
            t.samples[("read back", STATUS_VIA_DAEMON)] = r
    finally:
        d.stop()
    return out


def wall_of(samples, key):
    """Whether `key` has a finished (not stopped) sample."""
    return any(not s["stopped"] for s in samples.get(key, []))


def bench_scaling(sizes, runs_small, runs_big, quick, tmp):
    """7. The scaling table: per size, each tool `runs` times (fewer above 60,000), rotating the
    order; masqd's results checked against the kernel (the set's element count from `nft list
    set`, the changed CIDR looked up by key, `status` in sync)."""
    gone, res = set(), {}
    for n in sizes:
        t = Tools(n, tmp, gone)
        steps = [t.masqd, t.nft, lambda: t.iptables("iptables-legacy-restore", "legacy"),
                 lambda: t.iptables("iptables-nft-restore", "iptnft")]
        runs = runs_small if n <= 60000 else runs_big
        try:
            for r in range(runs):
                for step in steps[r % len(steps):] + steps[:r % len(steps)]:
                    step()
            tick = daemon_tick(t, quick) if wall_of(t.samples, ("full apply", "masqd apply")) else None
        finally:
            t.close()
        res[n] = {"rows": {k: summary(v) for k, v in t.samples.items()}, "tick": tick,
                  "runs": runs, "stopped": {k for k, v in t.samples.items() if any(s["stopped"] for s in v)}}
        log(f"  scaling N={n}: " + ", ".join(f"{k[1]} ({k[0]}) {v['wall'] * 1000:.1f} ms"
                                            for k, v in res[n]["rows"].items())
            + (f"; READY {tick['ready'] * 1000:.0f} ms, tick {(tick['user'] + tick['sys']) * 1000:.1f} ms"
               if tick and tick["ready"] is not None else "; daemon not READY in time" if tick else ""))
    return {"sizes": sizes, "res": res, "gone": gone}


# --------------------------------------------------------------------------- report

ROWS = [("full apply", "masqd apply"), ("full apply", "nft -f"), ("full apply", "iptables-legacy-restore"),
        ("full apply", "iptables-nft-restore"), ("onto existing", "masqd apply"),
        ("onto existing", "nft -f (flush set + all elements)"), ("read back", "masqd status (direct)"),
        ("read back", STATUS_VIA_DAEMON), ("read back", "nft list set")]
OPS = {"full apply": "full apply (from empty)", "onto existing": "apply onto the existing set (one CIDR added)",
       "read back": "read back"}


def ms(s):
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def verdict(ok):
    return "met" if ok else "MISSED"


def cell(res, n, key):
    """The table cells of one tool at one size: wall (spread), user, sys, peak RSS."""
    r = res[n]["rows"].get(key)
    if key in res[n]["stopped"]:
        return [f"> {LIMIT:.0f} s (stopped)", "", "", "", ""]
    if r is None:
        if key[1] == STATUS_VIA_DAEMON:
            return ["not measured: this masqd's `status` cannot ask a daemon (item 4's control socket)",
                    "", "", "", ""]
        return [f"not run (stopped at a smaller N: > {LIMIT:.0f} s)", "", "", "", ""]
    return [ms(r["wall"]), f"{ms(r['min'])}–{ms(r['max'])} ({r['n']})", ms(r["user"]), ms(r["sys"]),
            f"{r['rss'] / 1024:.1f} MiB" if r["rss"] else ""]


def wall(res, n, key):
    r = res.get(n, {}).get("rows", {}).get(key)
    return None if r is None or key in res[n]["stopped"] else r["wall"]


def scaling_targets(sc):
    res, sizes = sc["res"], sc["sizes"]
    L = []
    full = [(n, wall(res, n, ("full apply", "masqd apply")), wall(res, n, ("full apply", "nft -f"))) for n in sizes]
    ok = [(n, a / b) for n, a, b in full if a is not None and b is not None]
    if ok:
        L.append("- Full apply at or under 0.5× `nft -f` at every N: " + ", ".join(
            f"N={n:,} {x:.2f}×" for n, x in ok) + f" — **{verdict(all(x <= 0.5 for _, x in ok))}**.")
    big = 1000000
    if big not in res:
        L.append(f"- The targets at 1,000,000 (apply onto the existing set under 2× the from-empty time; "
                 f"`status` through the daemon under 0.2 s; a resync tick under 10 ms of CPU; READY onto an "
                 f"existing set within 2× the from-empty apply): not measured, this run's sizes were "
                 f"{', '.join(f'{n:,}' for n in sizes)}.")
        return L
    a, e = wall(res, big, ("full apply", "masqd apply")), wall(res, big, ("onto existing", "masqd apply"))
    if a is not None and e is not None:
        L.append(f"- Apply onto an existing set at 1,000,000 under 2× from empty: {ms(e)} vs {ms(a)} "
                 f"({e / a:.2f}×) — **{verdict(e < 2 * a)}**.")
    else:
        why = f"> {LIMIT:.0f} s (stopped)" if ("onto existing", "masqd apply") in res[big]["stopped"] else "not run"
        L.append(f"- Apply onto an existing set at 1,000,000 under 2× from empty: {why} — **MISSED**.")
    s = wall(res, big, ("read back", STATUS_VIA_DAEMON))
    L.append(f"- `status` at 1,000,000 with the daemon running under 0.2 s: " +
             (f"{ms(s)} — **{verdict(s < 0.2)}**." if s is not None else
              "not measured (this masqd's `status` has no way to ask the daemon yet)."))
    tick = res[big]["tick"]
    if tick and tick["ready"] is None:
        L.append(f"- `masqd run` onto the existing 1,000,000-element set: not READY within {LIMIT:.0f} s "
                 "(stopped) — **MISSED**; the resync tick at 1,000,000 is therefore not measured.")
    elif tick:
        c = tick["user"] + tick["sys"]
        L.append(f"- A resync tick at 1,000,000 under 10 ms of CPU: {ms(c)} — **{verdict(c < 0.01)}**.")
        if a is not None:
            L.append(f"- `masqd run` onto the existing 1,000,000-element set READY within 2× the from-empty "
                     f"apply: {ms(tick['ready'])} vs {ms(a)} ({tick['ready'] / a:.2f}×) — "
                     f"**{verdict(tick['ready'] <= 2 * a)}**.")
    return L


def report_scaling(sc):
    if not sc:
        return []
    res, sizes = sc["res"], sc["sizes"]
    L = ["## 7. Scaling: 1,000 to 1,000,000 exceptions\n",
         "N disjoint /28 exceptions (N intervals) in the TOML array. Each tool in its own netns, the tools "
         "in a rotating order, several runs per size (fewer above 60,000; the count is in the spread "
         "column). **Full apply**: from an empty node; `nft -f` loads the identical ruleset "
         "(`masqd export`), the iptables tools the ip-masq-agent layout (one RETURN rule per CIDR in "
         "its chain). **Onto the existing set**: one CIDR added to the N just applied; `nft -f` sends "
         "what a knftables-style tool sends (flush the set, add all N + 1). **Read back**: "
         "`masqd status --json` reading the kernel itself, and `nft list set` of masqd's set. "
         "Each masqd result is checked against the kernel: `nft list set` (the row above) must hold "
         "exactly N intervals after the apply (where it was stopped, every 1,000th CIDR and the last "
         "are looked up by key instead); the added CIDR is looked up by key (one `NFT_MSG_GETSETELEM`) "
         "after the apply onto the set; and `status` must say in sync. Wall is the median, the spread "
         "is min–max (runs); user and sys are medians of the whole process tree's CPU time (wait4): "
         "sys is the kernel's share, the distance to the physical limit. A tool still running after "
         f"{LIMIT:.0f} s is killed and shown as stopped, and not run again at larger N.\n",
         "| N | operation | tool | wall | spread (runs) | user | sys | peak RSS |",
         "|---:|---|---|---:|---|---:|---:|---:|"]
    for n in sizes:
        for key in ROWS:
            L.append(f"| {n:,} | {OPS[key[0]]} | {key[1]} | " + " | ".join(cell(res, n, key)) + " |")
    L.append("\nThe daemon at each size: `masqd run` started onto the N + 1 intervals left by the runs "
             "above (start → `READY=1`), then its CPU time (/proc/PID/stat utime + stime) over "
             f"a few resync ticks with `[daemon] resync_interval = \"{RESYNC_S:.0f}s\"`, divided by the ticks; "
             "reconciles and netlink dumps over the same window from its metrics "
             "(`masqd_sync_duration_seconds_count`, `masqd_netlink_dumps_total`). For comparison, "
             "ip-masq-agent re-runs its whole `iptables-restore` (the full-apply row) at each of its "
             "resyncs. CPU time is counted in 10 ms ticks: below ~2 ms per tick the figure is coarse.\n")
    L.append("| N | start onto the existing set → READY=1 | CPU per resync tick (user + sys) | user | sys | "
             "ticks | reconciles | dumps |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        t = res[n]["tick"]
        if not t:
            L.append(f"| {n:,} | not run (no apply onto the set) | | | | | | |")
            continue
        if t["ready"] is None:
            L.append(f"| {n:,} | > {LIMIT:.0f} s (stopped) | not measured | | | | | |")
            continue
        mt = (lambda v: f"{v:.0f}") if t["metrics"] else (lambda v: "?")
        L.append(f"| {n:,} | {ms(t['ready'])} | {ms(t['user'] + t['sys'])} | {ms(t['user'])} | {ms(t['sys'])} | "
                 f"{t['ticks']:.1f} | {mt(t['syncs'])} | {mt(t['dumps'])} |")
    L.append("\n**Targets:**\n")
    L += scaling_targets(sc)
    L.append("")
    return L

