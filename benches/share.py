#!/usr/bin/env python3
"""Where the machine's CPU goes in a saturation run: the proxy, the backend and what is left idle.

On this 2-core machine the load generator, the proxy and the backend share the cores, so the
requests per second of a run are set by what all of them spend per request together, not by the
proxy's cost alone. This runs `wrk -t2 -c64` through each contender in turn, in rounds in a
shuffled order (compare.py's contenders, configs and backend), and prints per run:

- req/s; the proxy's and the backend's CPU per request (user + system, /proc/PID/stat), and
  the rest of the cores' time per request (wrk, mostly);
- the machine's idle core-seconds over the run (/proc/stat): 0 means the cores were saturated;
- for each thread of the proxy: its CPU seconds, and its voluntary (it went to sleep) and
  involuntary (it was preempted) context switches per request;
- for luma-proxy and HAProxy, the size of each event-loop's watch list (/proc/PID/fdinfo of
  each epoll fd), which shows how the 64 client connections split over the workers.

Usage: benches/share.py [--contenders luma-proxy,haproxy] [--workers 2] [--rounds 4] [--seconds 8]
                        [--baseline BINARY]   (another luma-proxy build beside it, as 'luma-base')
Build first: cargo build --release -p luma-proxy -p luma-demo-backend -p luma-benches
"""
import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as c  # noqa: E402


def watch_lists(pid):
    """The number of fds each epoll instance of `pid` watches (tokio registers its fds twice
    under one instance's two fds, so luma-proxy's appear in pairs)."""
    sizes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventpoll]":
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    sizes.append(sum(1 for line in f if line.startswith("tfd:")))
        except OSError:
            pass
    return sorted(sizes)


def threads(root):
    """{tid: (name, voluntary switches, involuntary switches, CPU ticks)} over `root`'s tree."""
    out = {}
    for pid in c.tree_pids(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    status = f.read()
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[tid] = (re.search(r"Name:\s+(\S+)", status).group(1),
                        int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1)),
                        int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1)),
                        int(stat[11]) + int(stat[12]))
    return out


def machine_ticks():
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def one_run(contender, backend, seconds):
    pid = contender.proc.pid
    lists = {}

    def look():  # halfway through, when every connection is open
        time.sleep(seconds / 2)
        lists["sizes"] = watch_lists(pid)

    looker = threading.Thread(target=look)
    looker.start()
    def snapshot():
        return (threads(pid), c.cpu_seconds(c.tree_pids(pid)), c.cpu_seconds(c.tree_pids(backend.pid)),
                machine_ticks())

    before, proxy_before, backend_before, ticks_before = snapshot()
    rps, requests, errors = c.wrk(contender.port, seconds)
    after, proxy_after, backend_after, ticks_after = snapshot()
    looker.join()
    if errors or not requests:
        raise RuntimeError(f"{contender.name}: {errors} errors in {requests} requests")
    # All in the same window, the one between the snapshots (wrk's start and end included).
    delta = [a - b for a, b in zip(ticks_after, ticks_before)]
    idle, cores = (delta[3] + delta[4]) / c.CLK, sum(delta) / c.CLK
    # The process tree's own counters keep the time of threads that ended meanwhile.
    proxy_cpu = proxy_after - proxy_before
    zero = ("", 0, 0, 0)  # a thread that started meanwhile counts from nothing
    per_thread = [f"{name} {(cpu - before.get(t, zero)[3]) / c.CLK:.2f}s "
                  f"vol {(v - before.get(t, zero)[1]) / requests:.3f} invol {(nv - before.get(t, zero)[2]) / requests:.3f}"
                  for t, (name, v, nv, cpu) in sorted(after.items())
                  if cpu - before.get(t, zero)[3] > 10]
    backend_cpu = backend_after - backend_before
    # Everything else the cores did: wrk, and whatever ran beside the run.
    rest = cores - idle - proxy_cpu - backend_cpu
    return (f"{contender.name:11s} {rps:8,.0f} req/s | proxy {proxy_cpu / requests * 1e6:5.1f} µs/req | "
            f"backend {backend_cpu / requests * 1e6:5.1f} µs/req | rest {rest / requests * 1e6:5.1f} µs/req | "
            f"idle {idle:.2f} core-s | "
            f"watch lists {lists.get('sizes')} | " + "; ".join(per_thread))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contenders", default="luma-proxy,haproxy")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--baseline", metavar="BINARY", help="also run this luma-proxy build, as 'luma-base'")
    a = ap.parse_args()
    os.chdir(c.ROOT)
    names = a.contenders.split(",") + (["luma-base"] if a.baseline else [])
    c.BASELINE = os.path.abspath(a.baseline) if a.baseline else None
    unknown = [n for n in names if n not in ("luma-proxy", "luma-base", "nginx", "haproxy")]
    if unknown:
        ap.error(f"unknown contenders {unknown}: choose from luma-proxy, nginx, haproxy")
    # A signal must still stop the contenders and the backend (the finally below).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    tmp = tempfile.mkdtemp(prefix="luma-share-")
    backend = subprocess.Popen([f"{c.REL}/luma-demo-backend"], stdout=subprocess.DEVNULL,
                               env=dict(os.environ, PORT=str(c.BACKEND), BIND="127.0.0.1", DEMO_BODY_BYTES="1024"))
    started = []
    try:
        c.wait_port(c.BACKEND, proc=backend)
        for name in names:
            contender = c.Contender(name, a.workers, tmp)
            contender.start()
            started.append(contender)
        for contender in started:
            c.wrk(contender.port, 2)  # warm-up
        rng = random.Random(1)
        for r in range(a.rounds):
            for contender in rng.sample(started, len(started)):
                print(f"round {r} {one_run(contender, backend, a.seconds)}", flush=True)
    finally:
        for contender in started:
            contender.stop()
        backend.terminate()
        backend.wait()
        subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
