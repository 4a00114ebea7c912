#!/usr/bin/env python3
"""Memory per idle client connection: luma-proxy side by side with nginx and HAProxy (issue 12).

Every contender runs with 1 worker in front of the same backend (luma-demo-backend, 1 KiB body,
as in compare.py), with the same idle limits (IDLE_S, longer than any measurement) and
connection limits above the round's count. For each count N (a round) and each row (contender x
protocol), a freshly started contender is measured:
  1. "before": its RSS (VmRSS summed over its processes; nginx = master + worker), settled, with
     no client connection yet;
  2. "with N idle": benches/src/bin/luma-idle.rs opens N connections, 32 at a time, each makes ONE
     exchange (h1: a keep-alive HTTP/1.1 GET, the whole response read; h2: the same over h2c with
     prior knowledge; ws: a WebSocket handshake through the proxy, then an idle tunnel) and then
     idles; once all are open and answered, RSS is sampled until it settles;
  3. at that moment the client checks, without sending a byte, that every connection is still
     open (end of file, reset or stray bytes count as closed by the proxy); with
     --second-exchange (always in --smoke) it then makes a second exchange on each (GET, or a
     WebSocket frame that must echo back) to prove they still work;
  4. "after close": the client closes all N, RSS settles again; its ratio to "before".
Per idle connection = (with N idle - before) / connections found open at the check.

luma-demo-backend has no upgrades, so the WebSocket rows have their own backend,
`luma-idle ws-backend` (RFC 6455 handshake, frame echo). Connections that failed, or that the
proxy closed before the check, are counted in the table and make the script exit 1; a memory
figure never does. A row that needs more file descriptors than this machine's hard
RLIMIT_NOFILE allows a process (N, twice that for a tunnel, plus a reserve) is not run and says
so in the table.

Ports 18200-18299 (compare.py uses 181xx, so both can run at once).

Usage: benches/idle.py [--smoke] [--counts 5000,20000] [--contenders luma-proxy,nginx,haproxy]
                       [--modes h1,h2,ws] [--out docs/idle-memory.md]
--smoke: N = 200, one round, quick settling; checks the harness and fails on any failed or
early-closed connection; < 30 s. It prints its report and writes it only with an explicit --out.
Prerequisites: cargo build --release -p luma-proxy -p luma-demo-backend -p luma-benches
"""
import argparse
import atexit
import json
import os
import platform
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (render, wait_port, tree_pids, version, ROOT, REL)

ROOT, REL = compare.ROOT, compare.REL
BACKEND = 18200
WS_BACKEND = 18201
PORTS = {"luma-proxy": 18210, "nginx": 18220, "haproxy": 18230}
# h2c with prior knowledge: luma-proxy takes it on its HTTP listener, nginx 1.22 and HAProxy on
# a listener of their own.
H2_PORTS = {"luma-proxy": 18210, "nginx": 18221, "haproxy": 18231}
LUMA_HTTPS, LUMA_ADMIN = 18211, 18219
NAMES = ["luma-proxy", "nginx", "haproxy"]
MODES = ["h1", "h2", "ws"]
MODE_LABEL = {"h1": "HTTP/1.1 keep-alive", "h2": "HTTP/2 (h2c)", "ws": "WebSocket tunnel"}
WORKERS = 1
IDLE_S = 900  # every contender's idle limits: far longer than a row takes
SETTLE_WINDOW = 5.0  # seconds RSS must stay within 1% to count as settled
CONCURRENCY = 32  # connections opened at a time: a small upstream pool suffices for all
# File descriptors a contender needs besides its connections: stdio, listeners, epoll, log and
# state files, the upstream pool, health checks.
FD_RESERVE = 256

_PROCS = []  # everything this script started, stopped on any exit
# The luma-proxy binary the run measures: a copy of target/release/luma-proxy taken at the start,
# so that a rebuild during the run cannot give its rows different binaries.
LUMA = {"exe": f"{REL}/luma-proxy", "sha256": "", "mtime": ""}


def raise_nofile():
    """Soft RLIMIT_NOFILE up to the hard one (raising the hard limit needs CAP_SYS_RESOURCE)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def spawn(cmd, **kw):
    # The raised limit is inherited (main() raises it before the first spawn): no preexec_fn,
    # which is unsafe once the client reader threads run.
    p = subprocess.Popen(cmd, **kw)
    _PROCS.append(p)
    return p


def stop(p, sig=signal.SIGTERM, timeout=10):
    if p is None or p.poll() is not None:
        return
    try:
        p.send_signal(sig)
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    except ProcessLookupError:
        pass


def cleanup():
    # Clients first (their sockets close), then proxies, then backends: reverse start order.
    for p in reversed(_PROCS):
        stop(p, timeout=5)


def rss_kib(pids):
    return compare.status_kib(pids, "VmRSS")


def fd_count(pids):
    """Open file descriptors of the contender: shows whether it let go of the closed sockets."""
    n = 0
    for p in pids:
        try:
            n += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return n


def settle(pids_fn, quick):
    """Samples RSS until every sample of the last `window` seconds is within 1% of the latest.
    Returns (KiB, settled?). The window is 5 s, not 2: luma-proxy's allocator (mimalloc) gives a
    burst's pages back about 3 s after it, so a 2 s window can settle on the plateau before."""
    interval, window, cap = (0.1, 0.5, 3.0) if quick else (0.5, SETTLE_WINDOW, 60.0)
    samples, t0 = [], time.monotonic()
    while True:
        now = time.monotonic()
        kib = rss_kib(pids_fn())
        samples.append((now, kib))
        recent = [k for t, k in samples if now - t <= window + 1e-3]
        if now - t0 >= window - 1e-3 and max(abs(k - kib) for k in recent) <= 0.01 * max(kib, 1):
            return kib, True
        if now - t0 >= cap:
            return kib, False
        time.sleep(interval)


def luma_help():
    global _HELP
    if _HELP is None:
        r = subprocess.run([LUMA["exe"], "serve", "--help"], capture_output=True, text=True)
        _HELP = r.stdout + r.stderr
    return _HELP


_HELP = None


def snapshot_luma(tmp, src):
    import hashlib
    LUMA["src"] = src
    LUMA["mtime"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.stat(src).st_mtime))
    LUMA["exe"] = os.path.join(tmp, "luma-proxy")
    shutil.copy2(src, LUMA["exe"])
    with open(LUMA["exe"], "rb") as f:
        LUMA["sha256"] = hashlib.sha256(f.read()).hexdigest()[:12]
    LUMA["version"] = compare.version([LUMA["exe"], "--version"]).split()[-1]


class Contender:
    """One proxy for one row, on this script's ports, with the idle settings."""

    def __init__(self, name, backend_port, max_connections, tmp):
        self.name, self.backend_port, self.max_connections, self.tmp = name, backend_port, max_connections, tmp
        self.port, self.h2_port, self.proc = PORTS[name], H2_PORTS[name], None

    def start(self):
        tmp, hard = self.tmp, resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        fmt = dict(workers=WORKERS, tmp=tmp, port=self.port, h2_port=self.h2_port, backend_port=self.backend_port,
                   max_connections=self.max_connections, idle_s=IDLE_S, nofile=hard)
        if self.name == "luma-proxy":
            state = os.path.join(tmp, "luma-state")
            cmd = [LUMA["exe"], "serve", "--http", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{LUMA_ADMIN}",
                   "--state-dir", state, "--no-access-log", "--workers", str(WORKERS), "--allow-literal-targets",
                   "--max-connections", str(self.max_connections),
                   "--header-read-timeout", f"{IDLE_S}s", "--idle-timeout", f"{IDLE_S}s",
                   # Only matters when the harness stops it early (Ctrl-C with tunnels open).
                   "--shutdown-timeout", "2s"]
            h = luma_help()
            if "--https" in h:  # loopback, on this script's port: the default 0.0.0.0:8443 may be taken
                cmd += ["--https", f"127.0.0.1:{LUMA_HTTPS}"]
            if "--acme-directory" in h:
                cmd += ["--acme-directory", "off"]
            if "--metrics" in h:  # no peer has a metrics listener either
                cmd += ["--metrics", "off"]
        elif self.name == "nginx":
            os.makedirs(os.path.join(tmp, "body"), exist_ok=True)
            conf = os.path.join(tmp, "nginx.conf")
            with open(conf, "w") as f:
                f.write(compare.render("benches/peers/nginx-idle.conf.in", fmt))
            cmd = ["nginx", "-p", tmp, "-c", conf, "-g", "daemon off;"]
        else:
            conf = os.path.join(tmp, "haproxy.cfg")
            with open(conf, "w") as f:
                f.write(compare.render("benches/peers/haproxy-idle.cfg.in", fmt))
            cmd = ["haproxy", "-db", "-f", conf]
        self.log = os.path.join(tmp, f"{self.name}.log")
        with open(self.log, "w") as logf:
            self.proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=logf)
        try:
            compare.wait_port(self.port, proc=self.proc)
            compare.wait_port(self.h2_port, proc=self.proc)
            if self.name == "luma-proxy":
                subprocess.run([LUMA["exe"], "deploy", "--admin", f"127.0.0.1:{LUMA_ADMIN}", "--state-dir", state,
                                "--host", "127.0.0.1", "--project", "idle", "--target", f"127.0.0.1:{self.backend_port}"],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60)
        except (RuntimeError, subprocess.SubprocessError) as e:
            self.stop()
            detail = getattr(e, "stderr", None) or ""
            raise RuntimeError(f"{self.name}: {e} {detail.strip()[:500] if isinstance(detail, str) else ''}\n{self.log_tail()}") from e

    def log_tail(self):
        try:
            with open(self.log) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def pids(self):
        return compare.tree_pids(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def stop(self):
        # nginx: SIGQUIT is its graceful stop (SIGTERM would also do); the others SIGTERM.
        stop(self.proc, signal.SIGQUIT if self.name == "nginx" else signal.SIGTERM)


class Client:
    """A `luma-idle open` process: one JSON event per line on stdout, commands on stdin."""

    def __init__(self, port, mode, n):
        self.proc = spawn([f"{REL}/luma-idle", "open", "--addr", f"127.0.0.1:{port}", "--mode", mode,
                           "--count", str(n), "--host", f"127.0.0.1:{port}", "--concurrency", str(CONCURRENCY)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.events.put(line)
        self.events.put(None)

    def event(self, want, timeout):
        try:
            line = self.events.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"luma-idle: no '{want}' within {timeout:.0f} s")
        if line is None:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise RuntimeError(f"luma-idle exited before '{want}': {err.strip()[:500]}")
        ev = json.loads(line)
        if ev.get("event") != want:
            raise RuntimeError(f"luma-idle: expected '{want}', got {line.strip()[:500]}")
        return ev

    def command(self, cmd, want, timeout):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.event(want, timeout)

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # end of input: it closes everything and exits
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fds_needed(mode, n):
    # A tunnel holds the client's socket and the one to the backend.
    return n * (2 if mode == "ws" else 1) + FD_RESERVE


def run_row(name, mode, n, tmp, quick, second_exchange):
    row = {"name": name, "mode": mode, "n": n}
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if fds_needed(mode, n) > hard:
        row["skipped"] = (f"needs about {fds_needed(mode, n):,} file descriptors in one process; "
                          f"the hard RLIMIT_NOFILE here is {hard:,}")
        return row
    # Every contender gets the same limit, above the round's connections on both sides.
    row["limit"] = 2 * n + 1000
    c = Contender(name, WS_BACKEND if mode == "ws" else BACKEND, row["limit"], tempfile.mkdtemp(dir=tmp))
    c.start()
    client = None
    try:
        row["before"] = settle(c.pids, quick)
        row["fds"] = [fd_count(c.pids())]
        client = Client(c.h2_port if mode == "h2" else c.port, mode, n)
        step = 60 + n / 100  # generous: a proxy that stalls fails the row, it never hangs it
        row["opened"] = client.event("opened", step)
        row["with"] = settle(c.pids, quick)
        row["fds"].append(fd_count(c.pids()))
        row["checked"] = client.command("check", "checked", step)
        # Off by default outside smoke mode: a second request wakes every connection up, so the
        # "after close" figure would no longer be that of closing idle connections.
        row["verified"] = client.command("verify", "verified", step) if second_exchange else None
        client.command("close", "closed", step)
        row["after"] = settle(c.pids, quick)
        row["fds"].append(fd_count(c.pids()))
        if c.proc.poll() is not None:
            raise RuntimeError(f"{name} exited during the row: {c.log_tail()}")
    finally:
        if client:
            client.stop()
        c.stop()
    row["failures"] = failures(row)
    print(f"N={n} {name} {mode}: {summary(row)}", file=sys.stderr)
    return row


def failures(row):
    """Connections that failed to open, were closed before the check, or failed the second
    exchange; with their reasons."""
    o, ch, v = row["opened"], row["checked"], row["verified"]
    reasons = {}
    for label, ev in (("open", o), ("closed before the check", ch), ("second exchange", v)):
        for k, cnt in (ev["errors"].items() if ev else []):
            reasons[f"{label}: {k}"] = reasons.get(f"{label}: {k}", 0) + cnt
    # A connection closed before the check fails its second exchange too: count it once.
    again = max(0, v["failed"] - ch["closed"]) if v else 0
    return {"count": o["failed"] + ch["closed"] + again, "reasons": reasons}


def per_conn_kib(row):
    open_ = row["checked"]["open"]
    return (row["with"][0] - row["before"][0]) / open_ if open_ else None


def summary(row):
    k = per_conn_kib(row)
    return (f"before {row['before'][0] / 1024:.1f} MiB, with {row['with'][0] / 1024:.1f} MiB, "
            f"{'n/a' if k is None else f'{k:.2f}'} KiB/conn, after {row['after'][0] / 1024:.1f} MiB, "
            f"{row['checked']['open']}/{row['n']} open at check, "
            f"{row['verified']['ok'] if row['verified'] else '-'} second exchanges ok, FDs {'/'.join(map(str, row['fds']))}, "
            f"failures {row['failures']['count']}")


def mib(v):
    kib, settled = v
    return f"{kib / 1024:.1f} MiB" + ("" if settled else " (unsettled)")


def preallocated(rounds):
    """Bytes of "before" RSS per slot of the connection limit, per contender, when the rounds
    ran with different limits (nginx sizes its connection and event arrays by worker_connections)."""
    out = []
    for name in NAMES:
        by_limit = {}
        for _, rows in rounds:
            for r in rows:
                if r["name"] == name and "before" in r:
                    by_limit.setdefault(r["limit"], []).append(r["before"][0])
        if len(by_limit) >= 2:
            lo, hi = min(by_limit), max(by_limit)
            avg = lambda v: sum(v) / len(v)
            out.append(f"{name} {(avg(by_limit[hi]) - avg(by_limit[lo])) * 1024 / (hi - lo):.0f} B per slot")
    return out


def write(a, rounds, elapsed):
    cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    # The binary may or may not include uncommitted luma-proxy changes; say that there are some.
    changed = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "luma-proxy"], capture_output=True, text=True).stdout.strip()
    dirty = ", luma-proxy/ has uncommitted changes" if changed else ""
    luma_v = LUMA["version"]
    settle_txt = ("every 0.1 s until all samples of the last 0.5 s are within 1% of the latest, at most 3 s (smoke)" if a.smoke else
                  f"every 0.5 s until all samples of the last {SETTLE_WINDOW:.0f} s are within 1% of the latest, at most 60 s "
                  "(2 s proved too short: luma-proxy's RSS can sit at a burst's peak for about 3 s before its allocator gives the pages back)")
    lines = [
        "# Memory per idle connection",
        "",
        "Generated by `benches/idle.py`" + (" in smoke mode (N = 200: checks the harness, figures not meaningful)" if a.smoke else "")
        + f" on {time.strftime('%Y-%m-%d')}, in {elapsed:.0f} s. Issue 12.",
        "",
        f"- Machine: {os.cpu_count()} cores ({cpu.group(1) if cpu else platform.processor()}), {platform.system()} {platform.release()}; "
        f"hard RLIMIT_NOFILE {hard:,} (a process cannot raise it here).",
        f"- Versions: luma-proxy {luma_v} ({os.path.relpath(LUMA['src'], ROOT) if LUMA['src'].startswith(ROOT) else LUMA['src']} built {LUMA['mtime']}, sha256 {LUMA['sha256']}…; "
        f"HEAD {commit or '?'}{dirty}); {compare.version(['nginx', '-v'])}; {compare.version(['haproxy', '-v'])}.",
        f"- Each contender: 1 worker (luma-proxy `--workers 1`, nginx `worker_processes 1`, HAProxy `nbthread 1`), no access log, "
        f"started afresh for every row, in front of luma-demo-backend (127.0.0.1:{BACKEND}, 1 KiB body, HTTP/1.1 keep-alive) "
        f"with the settings of `benches/peers/nginx-idle.conf.in` and `haproxy-idle.cfg.in` (compare.py's, plus the ones below). "
        f"WebSocket rows: in front of `luma-idle ws-backend` (127.0.0.1:{WS_BACKEND}), since luma-demo-backend has no upgrades.",
        f"- Idle limits, the same {IDLE_S} s for all: luma-proxy `--header-read-timeout {IDLE_S}s --idle-timeout {IDLE_S}s`; nginx "
        f"`keepalive_timeout`, `client_header_timeout`, `proxy_read_timeout`, `proxy_send_timeout` {IDLE_S}s, `keepalive_requests 1000000`; "
        f"HAProxy `timeout client`, `http-request`, `http-keep-alive`, `tunnel` {IDLE_S}s.",
        "- Connection limits, the same for all, 2N + 1,000: luma-proxy `--max-connections`, nginx `worker_connections` "
        f"(and `worker_rlimit_nofile {hard:,}`), HAProxy `maxconn` (global and per frontend). luma-proxy also runs with `--metrics off`.",
        f"- Client: `luma-idle` (benches/src/bin/luma-idle.rs), {CONCURRENCY} connections opened at a time, one exchange each "
        "(h1: keep-alive GET, whole response read; h2: one GET over h2c with prior knowledge; WebSocket: the RFC 6455 handshake "
        "through the proxy), then idle. Right after the \"with N idle\" sample it checks, sending nothing, that every connection "
        "is still open (a socket read without blocking: end of file, reset or stray bytes count as closed by the proxy; h2: "
        "hyper's connection ended)."
        + (" Then it makes a second exchange on each (GET, or a WebSocket frame that must echo) to prove they still work, "
           "before closing them." if (a.smoke or a.second_exchange) else
           " No second request is made (`--second-exchange` adds one): the connections are closed as idle as they were measured."),
        f"- RSS: VmRSS summed over the contender's processes (nginx: master + worker), sampled {settle_txt}; "
        "\"(unsettled)\" marks a sample taken at the cap. \"before\": started, route deployed, no client connection yet. "
        "Per idle connection = (with N idle - before) / connections open at the check. \"after close\": all N closed by the client.",
        "",
    ]
    prealloc = preallocated(rounds)
    if prealloc:
        lines[-1:-1] = ["- RSS before grows with the configured connection limit, memory these contenders allocate at start "
                        "and so outside the per-connection column: " + ", ".join(prealloc)
                        + " (the slope of the rounds' \"before\" figures against their limits)."]
    for n, rows in rounds:
        lines += [f"## {n:,} idle connections", "",
                  f"| contender | protocol | RSS before | with {n:,} idle | per idle connection | after close | after/before | open at check | second exchange ok | failures |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        notes = []
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['name']} | {MODE_LABEL[r['mode']]} | not run: {r['skipped']} | | | | | | | |")
                continue
            if "error" in r:
                lines.append(f"| {r['name']} | {MODE_LABEL[r['mode']]} | harness error: {r['error']} | | | | | | | 1 |")
                continue
            k = per_conn_kib(r)
            second = f"{r['verified']['ok']:,}" if r["verified"] else "not asked"
            ratio = r["after"][0] / r["before"][0] if r["before"][0] else 0
            lines.append(f"| {r['name']} | {MODE_LABEL[r['mode']]} | {mib(r['before'])} | {mib(r['with'])} | "
                         f"{'n/a' if k is None else f'{k:.2f} KiB'} | {mib(r['after'])} | {ratio:.2f} | "
                         f"{r['checked']['open']:,} | {second} | {r['failures']['count']:,} |")
            for reason, cnt in r["failures"]["reasons"].items():
                notes.append(f"- {r['name']} {MODE_LABEL[r['mode']]}: {cnt:,} x {reason}")
            notes.append(f"- {r['name']} {MODE_LABEL[r['mode']]}: {n:,} opened in {r['opened']['secs']:.1f} s"
                         + (f", second exchange on all in {r['verified']['secs']:.1f} s" if r["verified"] else "")
                         + f"; contender's open FDs before / with {n:,} idle / after close: {' / '.join(f'{x:,}' for x in r['fds'])}")
        lines += [""] + (["Failures and timings:", ""] + notes + [""] if notes else [])
    lines += ["Reproduce: `cargo build --release -p luma-proxy -p luma-demo-backend -p luma-benches && benches/idle.py` "
              "(`--counts`, `--contenders`, `--modes` pick a subset; `--smoke` is the quick harness check).", ""]
    text = "\n".join(lines)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="N = 200, one round, quick settling: checks the harness (< 30 s)")
    ap.add_argument("--counts", default="5000,20000", help="idle connections per round, comma-separated")
    ap.add_argument("--contenders", default=",".join(NAMES), help=f"comma-separated subset of {','.join(NAMES)}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--second-exchange", action="store_true",
                    help="after the check, one more request (or WebSocket echo) on every connection before closing them (always on with --smoke)")
    ap.add_argument("--luma-binary", default=f"{REL}/luma-proxy",
                    help="the luma-proxy build to measure (copied at the start; default target/release/luma-proxy)")
    ap.add_argument("--out", default=None, help="report file (default docs/idle-memory.md; smoke mode writes one only when given)")
    a = ap.parse_args()
    names = [x for x in a.contenders.split(",") if x]
    modes = [x for x in a.modes.split(",") if x]
    bad = (set(names) - set(NAMES)) | (set(modes) - set(MODES))
    if bad:
        ap.error(f"unknown contenders or modes: {', '.join(sorted(bad))}")
    try:
        counts = [200] if a.smoke else [int(x) for x in a.counts.split(",") if x]
    except ValueError:
        ap.error("--counts takes comma-separated integers")
    if not counts or min(counts) <= 0:
        ap.error("--counts needs positive integers")
    if a.out is None and not a.smoke:
        a.out = os.path.join(ROOT, "docs", "idle-memory.md")
    for exe in [a.luma_binary, f"{REL}/luma-demo-backend", f"{REL}/luma-idle"]:
        if not os.access(exe, os.X_OK):
            sys.exit(f"idle.py: {exe} missing: cargo build --release -p luma-proxy -p luma-demo-backend -p luma-benches")
    for name in names:
        if name != "luma-proxy" and not shutil.which(name):
            sys.exit(f"idle.py: {name} is not installed (benches/install-peers.sh)")

    raise_nofile()
    atexit.register(cleanup)
    # SIGTERM ends the run like Ctrl-C: through the finally blocks and atexit, which stop
    # everything this script started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Ctrl-C too, even when started from a shell that left SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = tempfile.mkdtemp(prefix="luma-idle-")
    started = time.time()
    rounds = []
    try:
        snapshot_luma(tmp, os.path.abspath(a.luma_binary))
        backend = spawn([f"{REL}/luma-demo-backend"], env=dict(os.environ, PORT=str(BACKEND), BIND="127.0.0.1", DEMO_BODY_BYTES="1024"),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        compare.wait_port(BACKEND, proc=backend)
        if "ws" in modes:
            ws = spawn([f"{REL}/luma-idle", "ws-backend", "--listen", f"127.0.0.1:{WS_BACKEND}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            compare.wait_port(WS_BACKEND, proc=ws)
        for n in counts:
            rows = []
            for mode in modes:
                for name in names:
                    try:
                        rows.append(run_row(name, mode, n, tmp, a.smoke, a.smoke or a.second_exchange))
                    except (RuntimeError, OSError, ValueError) as e:
                        # Reported in its row and counted as a failure; the other rows still run.
                        print(f"N={n} {name} {mode}: error: {e}", file=sys.stderr)
                        rows.append({"name": name, "mode": mode, "n": n, "error": str(e).strip().splitlines()[0][:300],
                                     "failures": {"count": 1, "reasons": {}}})
            rounds.append((n, rows))
    finally:
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.time() - started
    print(f"idle.py: {elapsed:.0f} s", file=sys.stderr)
    write(a, rounds, elapsed)
    failed = sum(r["failures"]["count"] for _, rows in rounds for r in rows if "failures" in r)
    if failed:
        print(f"idle.py: {failed} connection(s) failed or were closed early (see the table)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # Everything started is already stopped (finally blocks, atexit).
        sys.exit("idle.py: interrupted; every process it started has been stopped")
