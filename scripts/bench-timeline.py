#!/usr/bin/env python3
"""The timeline workload of scripts/bench: where each small file's time goes on the gateway.

  analyse LAN.pcap WAN.pcap [PERF.txt CLIENT_IP NETLINK_FDS]
      Reads packet captures taken on the gateway's client side (lan0) and server side (wan0)
      during one lftp mirror, and, for ftp-alg, `perf script` output of the daemon's system
      calls (CLOCK_MONOTONIC; the pcaps carry CLOCK_REALTIME, the offset between the two is the
      first line of PERF.txt). Prints one JSON object: step name -> list of microseconds, one
      value per occurrence (per file for the per-file steps).
  table JSON_FILES... [--markdown FILE]
      Each file is {"setup", "mode", "round", "steps"}; prints per step and column (setup, mode)
      the median over rounds of each round's median.

Standard library only. The steps, in the order a passive file goes through them:

  client: reply -> next command   the client's own time (lftp)
  <VERB>: lan in -> wan out       a command's hop through the gateway (arrival on lan0 to
                                  departure on wan0)
  <VERB>: server                  wan out -> the server's reply back on wan0
  <CODE> reply: wan in -> lan out the reply's hop back
  data SYN: in -> out             the data connection's SYN through the gateway
  data SYN after 227/200          the client (or server) dialling after the announcement
  per file                        from one file's data command (PASV or PORT) to the next's

and, for ftp-alg, each hop split at the daemon's system calls: the wake-up (packet in to the
first read of it returning), the daemon's own work (read returned to the write entered), the
pinhole transaction (netlink send entered to its acknowledgement read), and the kernel's send
(write entered to the packet leaving).
"""

import json
import statistics
import struct
import sys

FTP = 21


def read_pcap(path):
    """(time ns, src, sport, dst, dport, flags, payload) of every IPv4 TCP packet in `path`."""
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack("<I", data[:4])[0]
    if magic == 0xA1B23C4D:
        scale = 1
    elif magic == 0xA1B2C3D4:
        scale = 1000
    else:
        sys.exit("%s: not a little-endian pcap file" % path)
    linktype = struct.unpack("<I", data[20:24])[0]
    if linktype != 1:
        sys.exit("%s: link type %d, expected Ethernet" % (path, linktype))
    packets = []
    off = 24
    while off + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack("<IIII", data[off:off + 16])
        frame = data[off + 16:off + 16 + caplen]
        off += 16 + caplen
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != 6 or len(ip) < ihl + 20:
            continue
        src, dst = ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        tcp = ip[ihl:]
        sport, dport = struct.unpack("!HH", tcp[:4])
        doff = (tcp[12] >> 4) * 4
        flags = tcp[13]
        length = total - ihl - doff
        payload = tcp[doff:doff + max(length, 0)]
        packets.append({"t": sec * 1_000_000_000 + frac * scale, "src": src, "sport": sport,
                        "dst": dst, "dport": dport, "flags": flags, "len": length,
                        "payload": payload})
    return packets


def lines(packets, to_server):
    """Control lines in `packets` in one direction: (time, first word) per line. A line cut by
    the capture's snap length still has its first word."""
    out = []
    for p in packets:
        if p["len"] <= 0 or FTP not in (p["sport"], p["dport"]):
            continue
        if (p["dport"] == FTP) != to_server:
            continue
        for line in p["payload"].split(b"\r\n"):
            word = line.split(b" ", 1)[0].decode("ascii", "replace")
            if not word:
                continue
            if not to_server:
                # Only a reply's last line (or a one-line reply) carries "NNN ".
                if len(line) < 4 or not line[:3].isdigit() or line[3:4] != b" ":
                    continue
                word = word[:3]
            out.append((p["t"], word.upper()))
    return out


def align(a, b):
    """Pair the lines of `a` and `b` that are the same line, in order: equal words, skipping
    lines only one side has (a gateway's own answers)."""
    pairs, j = [], 0
    for t, word in a:
        k = j
        while k < len(b) and b[k][1] != word and k - j < 3:
            k += 1
        if k < len(b) and b[k][1] == word:
            pairs.append((t, b[k][0], word))
            j = k + 1
    return pairs


def syns(packets, inbound):
    """Times of data-connection SYNs (not port 21) in `packets` that `inbound` selects."""
    return [p["t"] for p in packets
            if p["flags"] & 0x12 == 0x02 and FTP not in (p["sport"], p["dport"]) and inbound(p)]


def read_perf(path):
    """System calls from `perf script`: (enter ns, exit ns, name, fd, result), in order. The
    first line of the file is the realtime - monotonic offset in ns."""
    calls, pending = [], {}
    with open(path) as f:
        offset = int(f.readline())
        for line in f:
            parts = line.split(None, 4)
            if len(parts) < 5 or not parts[3].rstrip(":").replace(".", "").isdigit():
                continue
            tid = parts[1]
            t = int(parts[3].rstrip(":").replace(".", "")) + offset
            event, _, args = parts[4].partition(": ")
            event = event.rstrip(":")
            if "sys_enter_" in event:
                name = event.split("sys_enter_")[1]
                fd = None
                if "fd: 0x" in args:
                    fd = int(args.split("fd: 0x")[1].split(",")[0], 16)
                pending[tid] = (t, name, fd)
            elif "sys_exit_" in event and tid in pending:
                enter, name, fd = pending.pop(tid)
                ret = int(args.strip(), 16) if args.strip().startswith("0x") else 0
                if ret >= 1 << 63:
                    ret -= 1 << 64
                calls.append({"enter": enter, "exit": t, "name": name, "fd": fd, "ret": ret})
    return calls


def add(steps, name, ns):
    """Record one occurrence of the step `name`, `ns` nanoseconds long."""
    steps.setdefault(name, []).append(ns)


def analyse(lan_path, wan_path, perf_path=None, client_ip=None, netlink_fds=""):
    lan, wan = read_pcap(lan_path), read_pcap(wan_path)
    steps = {}

    # lan0: commands come in from the client, replies go out to it; wan0 the other way round.
    cmd_in = lines([p for p in lan if p["dport"] == FTP], True)
    cmd_out = lines([p for p in wan if p["dport"] == FTP], True)
    rep_in = lines([p for p in wan if p["sport"] == FTP], False)
    rep_out = lines([p for p in lan if p["sport"] == FTP], False)
    commands = align(cmd_in, cmd_out)
    replies = align(rep_in, rep_out)
    for a, b, verb in commands:
        add(steps, "%s: lan in -> wan out" % verb, b - a)
    for a, b, code in replies:
        add(steps, "%s reply: wan in -> lan out" % code, b - a)
    # The server's time: a command leaving wan0 to the first reply coming back after it; the
    # client's: a reply delivered on lan0 to the next command arriving.
    events = sorted([(b, "cmd", v) for _, b, v in commands] + [(a, "rep", c) for a, _, c in replies])
    for (t0, k0, w0), (t1, k1, _) in zip(events, events[1:]):
        if k0 == "cmd" and k1 == "rep":
            add(steps, "%s: server" % w0, t1 - t0)
    timeline = sorted([(a, "cmd") for a, _, _ in commands] + [(b, "rep") for _, b, _ in replies])
    for (t0, k0), (t1, k1) in zip(timeline, timeline[1:]):
        if k0 == "rep" and k1 == "cmd":
            add(steps, "client: reply -> next command", t1 - t0)
    data_cmds = [a for a, _, v in commands if v in ("PASV", "EPSV", "PORT", "EPRT")]
    for t0, t1 in zip(data_cmds, data_cmds[1:]):
        add(steps, "per file", t1 - t0)
    # Data connections: a passive one's SYN comes in on lan0, an active one's on wan0.
    syn_lan_in = syns(lan, lambda p: p["dport"] != FTP and p["sport"] > 1023 and p["src"] == client_ip)
    passive = bool(syn_lan_in)
    if passive:
        ins, outs = syn_lan_in, syns(wan, lambda p: p["dport"] > 1023)
    else:
        ins = syns(wan, lambda p: p["dport"] > 1023 or p["dport"] == 20 or p["sport"] == 20)
        outs = syns(lan, lambda p: p["dst"] == client_ip)
    for a, b in zip(ins, outs):
        add(steps, "data SYN: in -> out", b - a)
    announce = "227" if passive else "200"
    announced = [b for _, b, c in replies if c == announce]
    for t in announced:
        later = [s for s in ins if s > t]
        if later:
            add(steps, "data SYN after the %s reached the client" % announce if passive
                else "data SYN after the 200 reached the client (server dials)", later[0] - t)
    if perf_path:
        split_hops(steps, read_perf(perf_path), commands, replies,
                   {int(x) for x in netlink_fds.split(",") if x})
    return steps


def split_hops(steps, calls, commands, replies, netfilter_fds):
    """Split each hop through the daemon at its system calls."""
    reads = [c for c in calls if c["name"] in ("recvfrom", "read") and c["ret"] > 0
             and c["fd"] not in netfilter_fds]
    writes = [c for c in calls if c["name"] in ("sendto", "write", "writev") and c["fd"] not in netfilter_fds]
    nl_send = [c for c in calls if c["name"] == "sendto" and c["fd"] in netfilter_fds]
    nl_recv = [c for c in calls if c["name"] == "recvfrom" and c["fd"] in netfilter_fds and c["ret"] > 0]
    wakes = [c for c in calls if c["name"] == "epoll_wait"]

    def first(seq, after, key="exit"):
        for c in seq:
            if c[key] >= after:
                return c
        return None

    hops = [(a, b, v, "cmd") for a, b, v in commands] + [(a, b, c, "rep") for a, b, c in replies]
    for a, b, word, kind in hops:
        label = word if kind == "cmd" else "%s reply" % word
        # Tolerate the clock conversion's error: a read cannot end before its packet came in.
        read = first(reads, a - 2000)
        if read is None or read["exit"] > b:
            continue
        write = first(writes, read["exit"], key="enter")
        if write is None or write["enter"] > b:
            continue
        wake = first(wakes, a - 2000)
        if wake is not None and wake["exit"] <= read["exit"]:
            add(steps, "%s: packet in -> epoll_wait returns" % label, wake["exit"] - a)
            add(steps, "%s: epoll_wait returns -> read returns" % label, read["exit"] - wake["exit"])
        add(steps, "%s: packet in -> read returns" % label, read["exit"] - a)
        add(steps, "%s: read returns -> write entered" % label, write["enter"] - read["exit"])
        add(steps, "%s: write entered -> packet out" % label, b - write["enter"])
        sends = [c for c in nl_send if read["exit"] <= c["enter"] <= write["enter"]]
        if word in ("227", "229", "PORT", "EPRT"):
            add(steps, "%s: netlink transactions in the hop" % label, len(sends) * 1000)
        if sends:
            ack = first(nl_recv, sends[-1]["enter"])
            if ack is not None and ack["exit"] <= write["enter"]:
                add(steps, "%s: read returns -> pinhole request sent" % label, sends[0]["enter"] - read["exit"])
                add(steps, "%s: pinhole request -> acknowledgement read" % label, ack["exit"] - sends[-1]["enter"])
                add(steps, "%s: acknowledgement -> write entered" % label, write["enter"] - ack["exit"])
    data_cmds = [a for a, _, v in commands if v in ("PASV", "EPSV", "PORT", "EPRT")]
    for t0, t1 in zip(data_cmds, data_cmds[1:]):
        add(steps, "netlink transactions per file", 1000 * sum(1 for c in nl_send if t0 <= c["enter"] < t1))


def table(paths, markdown=None):
    runs = [json.load(open(p)) for p in paths]
    columns = []
    for r in runs:
        col = (r["setup"], r["mode"])
        if col not in columns:
            columns.append(col)
    columns.sort(key=lambda c: (c[1] != "pasv", not c[0].startswith("ftp-alg"), c[0]))
    per = {}
    order = []
    for r in runs:
        for step, values in r["steps"].items():
            if step not in order:
                order.append(step)
            m = statistics.median(values) / 1000
            per.setdefault((step, r["setup"], r["mode"]), []).append(m)
    head = ["step (median µs)"] + ["%s, %s" % (s, "passive" if m == "pasv" else "active") for s, m in columns]
    rows = []
    for step in sorted(order, key=step_key):
        row = [step]
        for s, m in columns:
            v = per.get((step, s, m))
            if not v:
                row.append("")
                continue
            row.append("%.1f" % statistics.median(v))
        rows.append(row)
    rounds = max(len(v) for v in per.values()) if per else 0
    text = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    text += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    text += "\nMedian over %d rounds of each round's median; transaction counts are per hop or per file.\n" % rounds
    print(text)
    if markdown:
        with open(markdown, "w") as f:
            f.write(text)


def step_key(step):
    """Steps in the order a file goes through them."""
    order = ["per file", "client", "PASV", "EPSV", "PORT", "EPRT", "227", "229", "200", "data SYN",
             "RETR", "150", "226", "MDTM", "213", "SIZE"]
    for i, prefix in enumerate(order):
        if step.startswith(prefix):
            return (i, step)
    return (len(order), step)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "analyse":
        print(json.dumps(analyse(*args)))
    elif cmd == "table":
        markdown = None
        if "--markdown" in args:
            i = args.index("--markdown")
            markdown = args[i + 1]
            args = args[:i] + args[i + 2:]
        table(args, markdown)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
