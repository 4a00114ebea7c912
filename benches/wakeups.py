#!/usr/bin/env python3
"""How often the proxy makes its peers wake up: wrk's and the backend's wake-ups per request.

On one machine, a proxy's cost is not only its own CPU: how it times its writes sets how often
the client and the backend are woken. A client waiting on 64 connections that gets the answers
one at a time calls `epoll_wait` for nearly every one; if the answers of one turn of the proxy's
event loop leave together, one call finds several.
This runs `wrk -t2 -c64` through each contender in turn (1 worker each, profile.py's configs
and backend, in rounds in a shuffled order) and counts, with `perf stat` over 6 s of each
10 s run, for the proxy, the backend and wrk:

- `epoll_wait` + `epoll_pwait` calls per request (the tracepoints `syscalls:sys_enter_*`);
- context switches per request;
- CPU (task-clock) microseconds per request;
- reads (`read` + `recvfrom`) per request.

Prints each run, then the medians per contender. Only 127.0.0.1 is used.

Usage: benches/wakeups.py [--contenders luma-proxy,nginx,haproxy] [--rounds 3]
                          [--luma NAME=BINARY ...]   (luma-proxy builds to run, each as NAME)
Build first: cargo build --release -p luma-proxy -p luma-demo-backend
"""
import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile as p  # noqa: E402  (benches/profile.py: the 1-worker configs and their ports)

EVENTS = ("syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_recvfrom,"
          "syscalls:sys_enter_read,context-switches,task-clock")
SECONDS = 6


def perf_stat(pid, out):
    return subprocess.Popen(["perf", "stat", "-x", ",", "-e", EVENTS, "-p", str(pid), "-o", out, "--",
                             "sleep", str(SECONDS)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def counts(path):
    got = {}
    with open(path) as f:
        for line in f:
            field = line.strip().split(",")
            if len(field) > 2 and field[0][:1].isdigit():
                got[field[2].replace("syscalls:sys_enter_", "")] = float(field[0])
    if "task-clock" not in got:
        raise RuntimeError(f"perf stat counted nothing ({path}): is perf allowed to trace here?")
    return got


def one_run(name, kind, binary, tmp, backend_pid):
    proc, sig = p.start(kind, tmp, binary, [])
    try:
        url = f"http://127.0.0.1:{p.PORTS[kind]}/"
        subprocess.run(["wrk", "-t2", "-c64", "-d2s", url], capture_output=True, check=True)  # warm-up
        wrk = subprocess.Popen(["wrk", "-t2", "-c64", "-d10s", url], stdout=subprocess.PIPE, text=True)
        subprocess.run(["sleep", "1"], check=True)
        who = {"proxy": proc.pid, "backend": backend_pid, "wrk": wrk.pid}
        stats = {k: perf_stat(pid, os.path.join(tmp, f"perf-{k}.csv")) for k, pid in who.items()}
        for s in stats.values():
            s.wait()
        out = wrk.communicate()[0]
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m or "Non-2xx" in out or "Socket errors" in out:
            raise RuntimeError(f"{name}: wrk failed or saw errors:\n{out}")
        rps = float(m.group(1))
        # Requests in the counted window, from wrk's rate over its whole run: the window is the
        # middle 6 s of 10, past the ramp-up, so the rate is taken as steady.
        n = rps * SECONDS
        row = {"req/s": rps}
        for k in who:
            c = counts(os.path.join(tmp, f"perf-{k}.csv"))
            row[f"{k} epoll_wait"] = (c.get("epoll_wait", 0) + c.get("epoll_pwait", 0)) / n
            row[f"{k} switches"] = c.get("context-switches", 0) / n
            row[f"{k} CPU µs"] = c["task-clock"] * 1e3 / n  # task-clock is in ms
            row[f"{k} reads"] = (c.get("recvfrom", 0) + c.get("read", 0)) / n
        return row
    finally:
        p.stop(proc, sig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contenders", default="luma-proxy,nginx,haproxy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--luma", action="append", default=[], metavar="NAME=BINARY",
                    help="a luma-proxy build to run as NAME (default: target/release/luma-proxy as luma-proxy)")
    a = ap.parse_args()
    builds = dict(kv.split("=", 1) for kv in a.luma)
    names = [n for n in a.contenders.split(",") if n != "luma-proxy" or not builds] + list(builds)
    if "luma-proxy" in names and "luma-proxy" not in builds:
        builds["luma-proxy"] = f"{p.REL}/luma-proxy"
    tmp = tempfile.mkdtemp(prefix="luma-wakeups-")
    backend = subprocess.Popen([f"{p.REL}/luma-demo-backend"],
                               env=dict(os.environ, PORT=str(p.BACKEND), BIND="127.0.0.1", DEMO_BODY_BYTES="1024"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = {}
    try:
        p.wait_port(p.BACKEND, timeout=60.0, proc=backend)
        for r in range(a.rounds):
            random.Random(r).shuffle(names)
            for name in names:
                kind = "luma-proxy" if name in builds else name
                row = one_run(name, kind, builds.get(name, ""), tempfile.mkdtemp(dir=tmp), backend.pid)
                rows.setdefault(name, []).append(row)
                print(f"round {r} {name}: " + ", ".join(f"{k} {v:,.3f}" for k, v in row.items()), flush=True)
    finally:
        backend.terminate()
        backend.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    keys = list(next(iter(rows.values()))[0])
    print(f"\nMedians of {a.rounds} rounds, per request (wrk -t2 -c64, 1 worker each):\n")
    print("| contender | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, rs in rows.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(r[k] for r in rs):,.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
