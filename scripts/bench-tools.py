#!/usr/bin/env python3
"""Helpers of scripts/bench: the raw FTP clients and server it runs inside its namespaces, the
check of what vsftpd received, and the statistics and the table. Standard library only.

  noop HOST PORT COUNT             one logged-in session, COUNT NOOPs one after the other;
                                   prints a JSON summary of the round-trip times (µs)
  noop-pair HOST PORT_ALG PORT_DIRECT COUNT
                                   NOOPs alternating between a session through ftp-alg and
                                   one only forwarded; medians and the paired difference (µs)
  transfers HOST PORT COUNT PATH   COUNT passive downloads of PATH on one session; prints
                                   the median of each phase (PASV→227, connect, ..., 226)
  idle-server ADDR PORT            answers every connection with 220 and then idles
  idle-client HOST PORT COUNT PID  opens COUNT control sessions, waits for each one's 220,
                                   reads VmRSS of PID before and with them open; prints JSON
  check-log LOG OFFSET VERB MIN CLIENT
                                   checks the data commands vsftpd logged after byte OFFSET
  sched TIMEHIST FILES ALG_PID KEY SETUP ROUND
                                   from `perf sched timehist` output of one mirror, per file:
                                   how often lftp, vsftpd and ftp-alg ran, changed CPU, and
                                   waited to run; prints result lines
  table RESULTS [MARKDOWN]         medians, ratios and targets of a results file, as a table
"""

import asyncio
import json
import re
import resource
import socket
import statistics
import sys
import time


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- control-channel round trip -------------------------------------------------------------


class Control:
    """A minimal FTP control connection: send a line, read one (single-line) reply."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def reply(self):
        while True:
            # A final reply line is "NNN text"; "NNN-" lines continue a multi-line reply.
            while b"\r\n" in self.buf:
                line, self.buf = self.buf.split(b"\r\n", 1)
                if len(line) >= 4 and line[:3].isdigit() and line[3:4] == b" ":
                    return line.decode("latin-1")
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("connection closed; buffered: %r" % self.buf)
            self.buf += data

    def command(self, line):
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()


def noop(host, port, count):
    c = login(host, port)
    for _ in range(200):  # warm-up: caches, the daemon's buffers, TCP's delayed-ACK state
        c.command("NOOP")
    samples = []
    send, recv, clock = c.sock.sendall, c.sock.recv, time.perf_counter_ns
    line = b"NOOP\r\n"
    for _ in range(int(count)):
        t0 = clock()
        send(line)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = recv(4096)
            if not chunk:
                raise ConnectionError("closed during NOOP")
            data += chunk
        samples.append(clock() - t0)
        if not data.startswith(b"200"):
            sys.exit("unexpected NOOP reply %r" % data)
    c.command("QUIT")
    samples.sort()
    us = [s / 1000 for s in samples]
    print(json.dumps({
        "n": len(us),
        "median_us": statistics.median(us),
        "p10_us": us[len(us) // 10],
        "p90_us": us[len(us) * 9 // 10],
        "p99_us": us[len(us) * 99 // 100],
    }))


def login(host, port):
    c = Control(host, int(port))
    greeting = c.reply()
    user = c.command("USER anonymous")
    login = c.command("PASS bench") if user.startswith("331") else user
    if not login.startswith("230"):
        sys.exit("login on port %s failed: %s / %s / %s" % (port, greeting, user, login))
    return c


def noop_pair(host, port_alg, port_direct, count):
    """Two logged-in sessions to the same server from the same client at the same time, one
    through ftp-alg (port_alg, intercepted) and one only forwarded (port_direct), NOOPs
    alternating between them: drift from other load on the machine hits both alike, and the
    difference is taken sample by sample. Prints medians (µs) as JSON."""
    a, b = login(host, port_alg), login(host, port_direct)
    clock = time.perf_counter_ns
    line = b"NOOP\r\n"

    def rtt(c):
        t0 = clock()
        c.sock.sendall(line)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = c.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during NOOP")
            data += chunk
        t1 = clock()
        if not data.startswith(b"200"):
            sys.exit("unexpected NOOP reply %r" % data)
        return (t1 - t0) / 1000

    for _ in range(200):
        rtt(a), rtt(b)
    through, direct, diff = [], [], []
    for i in range(int(count)):
        # Alternate which goes first, so neither always follows the other's wake-up.
        if i % 2:
            y, x = rtt(b), rtt(a)
        else:
            x, y = rtt(a), rtt(b)
        through.append(x)
        direct.append(y)
        diff.append(x - y)
    a.command("QUIT")
    b.command("QUIT")
    print(json.dumps({
        "n": len(diff),
        "through_median_us": round(statistics.median(through), 2),
        "direct_median_us": round(statistics.median(direct), 2),
        "diff_median_us": round(statistics.median(diff), 2),
    }))


def transfers(host, port, count, path):
    """`count` passive downloads of `path` on one session, each timed phase by phase:
    PASV until its 227, the data connection's connect, RETR until 150, the data until EOF,
    and the wait for 226. Prints the median of each phase (µs) as JSON."""
    c = Control(host, int(port))
    c.reply()
    user = c.command("USER anonymous")
    if user.startswith("331"):
        c.command("PASS bench")
    c.command("TYPE I")
    phases = {"pasv_227": [], "connect": [], "retr_150": [], "data": [], "wait_226": [],
              "total": []}
    clock = time.perf_counter_ns
    for _ in range(int(count)):
        t0 = clock()
        reply = c.command("PASV")
        t1 = clock()
        m = re.search(r"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)", reply)
        if not reply.startswith("227") or not m:
            sys.exit("PASV answered %r" % reply)
        n = [int(x) for x in m.groups()]
        data = socket.create_connection((".".join(map(str, n[:4])), n[4] * 256 + n[5]), 10)
        t2 = clock()
        started = c.command("RETR " + path)
        t3 = clock()
        if not started.startswith("150"):
            sys.exit("RETR answered %r" % started)
        while data.recv(65536):
            pass
        data.close()
        t4 = clock()
        done = c.reply()
        t5 = clock()
        if not done.startswith("226"):
            sys.exit("transfer ended with %r" % done)
        for key, a, b in [("pasv_227", t0, t1), ("connect", t1, t2), ("retr_150", t2, t3),
                          ("data", t3, t4), ("wait_226", t4, t5), ("total", t0, t5)]:
            phases[key].append((b - a) / 1000)
    c.command("QUIT")
    print(json.dumps({k: round(statistics.median(v), 1) for k, v in phases.items()}))


# --- idle sessions --------------------------------------------------------------------------


def idle_server(addr, port):
    raise_nofile()
    writers = set()

    async def handle(reader, writer):
        writers.add(writer)
        try:
            writer.write(b"220 idle bench server\r\n")
            await writer.drain()
            while await reader.read(4096):
                pass  # the bench's sessions never send anything; keep reading until EOF
        except OSError:
            pass
        finally:
            writers.discard(writer)
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, addr, int(port), backlog=4096)
        print("idle server listening on %s:%s" % (addr, port), flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def vm_rss_kib(pid):
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %s" % pid)


def idle_client(host, port, count, pid):
    raise_nofile()
    count = int(count)

    async def main():
        rss_before = vm_rss_kib(pid)
        gate = asyncio.Semaphore(200)  # connects in flight: stay below the listen backlog
        sessions = []
        failures = []

        async def one():
            async with gate:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(host, int(port)), 30)
                    line = await asyncio.wait_for(reader.readline(), 30)
                except (OSError, asyncio.TimeoutError) as e:
                    failures.append(repr(e))
                    return
                if not line.startswith(b"220"):
                    failures.append(line.decode("latin-1").strip())
                    writer.close()
                    return
                sessions.append(writer)

        t0 = time.monotonic()
        await asyncio.gather(*(one() for _ in range(count)))
        opened_in = time.monotonic() - t0
        await asyncio.sleep(2)  # let the daemon settle (lazy allocations, log lines)
        rss_with = vm_rss_kib(pid)
        alive = len(sessions)
        for w in sessions:
            w.close()
        await asyncio.sleep(0.5)
        out = {
            "sessions": alive,
            "failures": len(failures),
            "first_failures": sorted(set(failures))[:3],
            "open_seconds": round(opened_in, 2),
            "rss_idle_kib": rss_before,
            "rss_loaded_kib": rss_with,
            "kib_per_session": (rss_with - rss_before) / alive if alive else None,
        }
        print(json.dumps(out))

    asyncio.run(main())


# --- what vsftpd received -------------------------------------------------------------------

VSFTPD_COMMAND = re.compile(r'FTP command: Client "([^"]*)", "(\w+)')
DATA_VERBS = {"PASV", "EPSV", "PORT", "EPRT"}


def check_log(log, offset, verb, minimum, client):
    """What vsftpd logged after byte `offset`: the data commands it received must all be
    `verb` (PASV or PORT), at least `minimum` of them, and every command must come from
    `client` (the gateway's address when G translates, the client's when it only routes).
    Clients fall back silently (TESTING-NOTES.md), so a transfer that worked proves nothing
    about the mode. Prints the counts; exits 1 when the check fails."""
    verbs, clients = {}, {}
    with open(log, "rb") as f:
        f.seek(int(offset))
        for line in f.read().decode("latin-1").splitlines():
            m = VSFTPD_COMMAND.search(line)
            if m:
                peer, v = m.group(1), m.group(2).upper()
                verbs[v] = verbs.get(v, 0) + 1
                clients[peer] = clients.get(peer, 0) + 1
    summary = json.dumps({"verbs": verbs, "clients": clients}, sort_keys=True)
    problems = []
    if verbs.get(verb, 0) < int(minimum):
        problems.append("expected at least %s %s" % (minimum, verb))
    other = {v: n for v, n in verbs.items() if v in DATA_VERBS and v != verb}
    if other:
        problems.append("other data commands: %s" % other)
    if set(clients) != {client}:
        problems.append("expected every command from %s" % client)
    print(summary)
    if problems:
        print("vsftpd log check failed: " + "; ".join(problems), file=sys.stderr)
        sys.exit(1)


# --- where the scheduler put the processes ---------------------------------------------------

SCHED_METRICS = [("runs", "times it ran"), ("moves", "times it ran on another CPU than before"),
                 ("delay", "µs it waited, runnable, for a CPU")]


def sched(timehist, files, alg_pid, key, setup, rnd):
    """Per file, for each of lftp, vsftpd (all its processes) and ftp-alg (all its threads): how
    many times it was switched in, how many of those on another CPU than that thread's last
    run (a wake-up that crossed CPUs, with a cold cache), and its scheduling delay."""
    files, alg_pid = int(files), int(alg_pid)
    totals = {}
    last_cpu = {}
    line_re = re.compile(r"^\s*[\d.]+\s+\[(\d+)\]\s+(.+)\[(\d+)(?:/(\d+))?\]\s+"
                         r"([\d.]+)\s+([\d.]+)\s+([\d.]+)")
    with open(timehist) as f:
        for line in f:
            m = line_re.match(line)
            if not m:
                continue
            cpu, comm, tid = int(m.group(1)), m.group(2), int(m.group(3))
            pid = int(m.group(4) or tid)
            if pid == alg_pid:
                who = "ftp-alg"
            elif comm in ("lftp", "vsftpd"):
                who = comm
            else:
                continue
            t = totals.setdefault(who, {"runs": 0, "moves": 0, "delay": 0.0})
            t["runs"] += 1
            if tid in last_cpu and last_cpu[tid] != cpu:
                t["moves"] += 1
            last_cpu[tid] = cpu
            t["delay"] += float(m.group(6)) * 1000
    for who, t in sorted(totals.items()):
        for metric, _ in SCHED_METRICS:
            print("sched_%s_%s_%s\t%s\t%s\t%.2f" % (key, who, metric, setup, rnd,
                                                   t[metric] / files))


# --- statistics and the table ---------------------------------------------------------------

SETUPS = ["ftp-alg", "kernel helper", "open"]

# workload key: (title, unit, higher is better, target ratio or limit)
WORKLOADS = [
    ("small_pasv", "{files} x 1 KiB, lftp mirror, passive (PASV)", "s", False),
    ("small_port", "{files} x 1 KiB, lftp mirror, active (PORT)", "s", False),
    ("small_pasv_cpu", "{files} x 1 KiB, passive: the daemon's CPU time per file", "us", False),
    ("small_port_cpu", "{files} x 1 KiB, active: the daemon's CPU time per file", "us", False),
    ("reverse_pasv", "{files} x 1 KiB, lftp mirror, passive (PASV), reverse topology", "s", False),
    ("reverse_port", "{files} x 1 KiB, lftp mirror, active (PORT), reverse topology", "s", False),
    ("reverse_pasv_cpu", "{files} x 1 KiB, passive, reverse: the daemon's CPU time per file",
     "us", False),
    ("reverse_port_cpu", "{files} x 1 KiB, active, reverse: the daemon's CPU time per file",
     "us", False),
    ("xfer_pasv_227", "one passive transfer: PASV until 227 (median of {xfers})", "us", False),
    ("xfer_total", "one passive transfer: PASV until 226 (median of {xfers})", "us", False),
    ("parallel", "{parallel} curl downloads of 1 MiB at once, passive (until the last ends)", "s", False),
    ("parallel_cpu", "{parallel} downloads at once: the daemon's share of one core", "x", False),
    ("mirrors", "{mirrors} lftp mirrors of {mirror_files} files at once, passive", "s", False),
    ("mirrors_cpu", "{mirrors} mirrors at once: the daemon's share of one core", "x", False),
    ("bulk", "{bulk} MiB download, curl, passive (whole download)", "MiB/s", True),
    ("bulk_data", "{bulk} MiB download, after the first byte", "MiB/s", True),
    ("noop", "NOOP round trip, {noops} on one session", "us", False),
]


# The small-file mirrors whose target is ≤ 1.10 × the kernel helper (gateway and reverse).
SMALL_FILES = ("small_pasv", "small_port", "reverse_pasv", "reverse_port")


def fmt(value, unit):
    if value is None:
        return "-"
    if unit == "s":
        return "%.3f s" % value
    if unit == "MiB/s":
        return "%.0f MiB/s" % value
    if unit == "us":
        return "%.1f µs" % value
    if unit == "ms":
        return "%.0f ms" % value
    if unit == "KiB":
        return "%.1f MiB" % (value / 1024) if value >= 1024 else "%.2f KiB" % value
    return ("%g %s" % (value, unit)).rstrip()


def table(results, markdown=None):
    rows = {}
    by_round = {}
    meta = {}
    failures = []
    with open(results) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if parts[0] == "meta":
                meta[parts[1]] = parts[2]
            elif parts[0] == "fail":
                failures.append(parts[1:])
            else:
                workload, setup, rnd, value = parts[:4]
                rows.setdefault((workload, setup), []).append(float(value))
                by_round.setdefault((workload, setup), {})[rnd] = float(value)

    def median(key):
        values = rows.get(key)
        return statistics.median(values) if values else None

    def spread(key, unit):
        values = rows.get(key)
        if not values:
            return "-"
        if len(values) == 1:
            return "n=1"
        return "n=%d, %s – %s" % (len(values), fmt(min(values), unit), fmt(max(values), unit))

    out = []
    header = ["workload", "setup", "median", "ratio vs kernel helper", "target", "met?",
              "runs (min – max)"]
    out.append(header)
    verdicts = []
    for key, title, unit, higher in WORKLOADS:
        if not any(k == key for k, _ in rows) and not any(
                f[0] == key or f[0].startswith(key) for f in failures):
            continue
        title = title.format(**meta)
        helper = median((key, "kernel helper"))
        for setup in SETUPS:
            m = median((key, setup))
            if key.startswith("reverse") and setup == "open":
                continue
            ratio = "%.3f" % (m / helper) if m is not None and helper else "-"
            target = met = ""
            if setup == "ftp-alg" and key in SMALL_FILES:
                target = "≤ 1.10 × helper"
                ok = m is not None and helper is not None and m <= 1.10 * helper
                met = "yes" if ok else "no"
            elif setup == "ftp-alg" and key in ("parallel", "mirrors"):
                bound = 1.05 if key == "parallel" else 1.10
                target = "≤ %.2f × helper" % bound
                ok = m is not None and helper is not None and m <= bound * helper
                met = "yes" if ok else "no"
            elif setup == "ftp-alg" and key.startswith("bulk"):
                target = "≥ 0.98 × helper"
                ok = m is not None and helper is not None and m >= 0.98 * helper
                met = "yes" if ok else "no"
            if met and (m is None or helper is None):
                met = "n/a (failed)"
            if met:
                verdicts.append((title, met))
            out.append([title, setup, fmt(m, unit), ratio, target, met, spread((key, setup), unit)])
        if key == "bulk_data" and rows.get(("bulk_alg_cpu_ms", "ftp-alg")):
            out.append(["{bulk} MiB download: the daemon's CPU time".format(**meta), "ftp-alg",
                        "%.0f ms" % median(("bulk_alg_cpu_ms", "ftp-alg")), "-", "", "",
                        spread(("bulk_alg_cpu_ms", "ftp-alg"), "ms")])
        if key == "noop":
            # The target is judged on the paired figure: NOOPs alternating through ftp-alg and
            # through a session the same gateway only forwards, at the same moment, difference
            # taken NOOP by NOOP. Its two raw medians are shown beside it.
            paired = median(("noop_pair_diff", "ftp-alg"))
            if paired is not None:
                met = "yes" if paired <= 30 else "no"
                verdicts.append(("NOOP overhead (paired)", met))
                for pair_key, label in [("noop_pair_through", "through ftp-alg"),
                                        ("noop_pair_direct", "forwarded by the same gateway")]:
                    m = median((pair_key, "ftp-alg"))
                    if m is not None:
                        out.append(["NOOP round trip, paired: %s" % label, "ftp-alg",
                                    fmt(m, "us"), "-", "", "", spread((pair_key, "ftp-alg"), "us")])
                out.append(["NOOP overhead, paired on one gateway (through − forwarded, "
                            "alternating)", "ftp-alg", fmt(paired, "us"), "-", "≤ 30 µs", met,
                            spread(("noop_pair_diff", "ftp-alg"), "us")])
            alg = by_round.get(("noop", "ftp-alg"), {})
            direct = by_round.get(("noop", "open"), {})
            if set(alg) & set(direct):
                # Informational: two setups measured one after the other, the "open" one
                # without any ruleset, so drift between them and the missing firewall both land
                # in the difference. Per round, then the median over the rounds in which both
                # succeeded.
                diffs = [alg[r] - direct[r] for r in sorted(set(alg) & set(direct))]
                out.append(["NOOP difference between setups", "ftp-alg − open",
                            fmt(statistics.median(diffs), "us"), "-", "(info)", "",
                            "n=%d, %s – %s" % (len(diffs), fmt(min(diffs), "us"),
                                               fmt(max(diffs), "us"))])
    # Where the scheduler put the processes (--sched), per file of each mirror.
    titles = {key: title for key, title, _, _ in WORKLOADS}
    described = dict(SCHED_METRICS)
    for sched_key in sorted({k for k, _ in rows if k.startswith("sched_")}):
        key, who, metric = sched_key[len("sched_"):].rsplit("_", 2)
        title = "%s: %s, %s, per file" % (titles[key].format(**meta), who, described[metric])
        for setup in SETUPS:
            m = median((sched_key, setup))
            if m is not None:
                out.append([title, setup, "%.2f" % m, "-", "(info)", "",
                            spread((sched_key, setup), "")])
    for key, label in [("idle_rss_per_session", "RSS per idle session"),
                       ("idle_rss_idle", "daemon RSS, no session"),
                       ("idle_rss_loaded", "daemon RSS, {sessions} sessions")]:
        m = median((key, "ftp-alg"))
        if m is None:
            continue
        target = met = ""
        if key == "idle_rss_per_session":
            target = "≤ 16 KiB"
            met = "yes" if m <= 16 else "no"
            verdicts.append(("idle sessions", met))
        out.append(["{sessions} idle sessions: ".format(**meta) + label.format(**meta),
                    "ftp-alg", fmt(m, "KiB"), "-", target, met,
                    spread((key, "ftp-alg"), "KiB")])

    # Shared ports: ftp-alg in reverse mode with one data port against the default range.
    for key, title in [("ports_pasv", "{files} x 1 KiB, lftp mirror, passive, reverse mode"),
                       ("ports_port", "{files} x 1 KiB, lftp mirror, active, reverse mode")]:
        if not any(k == key for k, _ in rows):
            continue
        title = title.format(**meta)
        wide = median((key, "range"))
        for setup, label in [("one port", "ftp-alg, one port"),
                             ("range", "ftp-alg, 61000-64999")]:
            m = median((key, setup))
            ratio = "%.3f vs range" % (m / wide) if m is not None and wide else "-"
            target = met = ""
            if setup == "one port":
                target = "≤ 1.05 × range"
                met = "yes" if m is not None and wide and m <= 1.05 * wide else "no"
                verdicts.append((title + ", one port", met))
            out.append([title, label, fmt(m, "s"), ratio, target, met,
                        spread((key, setup), "s")])
        # The same ratio round by round (the two setups ran one after the other), then its
        # median: less exposed to load that drifts over the run than the ratio of medians.
        one, rng = by_round.get((key, "one port"), {}), by_round.get((key, "range"), {})
        paired = [one[r] / rng[r] for r in sorted(set(one) & set(rng)) if rng[r]]
        if paired:
            out.append([title, "one port / range, per round", "%.3f" % statistics.median(paired),
                        "-", "(info)", "", "n=%d, %.3f – %.3f" % (len(paired), min(paired),
                                                                   max(paired))])

    widths = [max(len(r[i]) for r in out) for i in range(len(header))]
    text = []
    for i, r in enumerate(out):
        text.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            text.append("  ".join("-" * w for w in widths))
    print("\n".join(text))
    notes = []
    if rows.get(("idle_rss_per_session", "ftp-alg")) and (
            meta.get("sessions") != meta.get("sessions_wanted")):
        notes.append("Idle sessions: %s instead of %s; the open-files hard limit here is %s and "
                     "root cannot raise it (no CAP_SYS_RESOURCE), and the daemon needs two "
                     "descriptors per session." % (meta.get("sessions"),
                                                   meta.get("sessions_wanted"),
                                                   meta.get("nofile")))
    for n in notes:
        print("\nNote: " + n)
    if failures:
        print("\nFailed runs (not in the medians):")
        for f in failures:
            print("  " + " | ".join(f))

    if markdown:
        md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in out[1:]]
        with open(markdown, "w") as f:
            f.write("\n".join(md) + "\n")
            for n in notes:
                f.write("\nNote: " + n + "\n")
            if failures:
                f.write("\nFailed runs (not in the medians):\n\n")
                for fl in failures:
                    f.write("- " + " | ".join(fl) + "\n")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "noop": noop,
        "transfers": transfers,
        "noop-pair": noop_pair,
        "idle-server": idle_server,
        "idle-client": idle_client,
        "check-log": check_log,
        "sched": sched,
        "table": table,
    }[cmd](*args)


if __name__ == "__main__":
    main()
