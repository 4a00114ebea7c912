#!/usr/bin/env python3
"""Latency at a fixed rate of several luma-proxy builds and nginx, in paired rounds, optionally
with the proxies on a core of their own.

Why: on a 2-core VM the fixed-rate p99 swings with the hypervisor's steal and with which core the
proxy shares with the load generator, so a change of tens of µs to the proxy's own path hides
in `compare.py`'s rounds. Here every contender (1 worker, or --workers) runs once per round, in
an order shuffled each round. On a VM with steal read the p50; on one without, the p99 too (both
are compared round by round). Beside them: the steal, the proxy's `connect`s (perf, when it is
installed), its minor page faults and its context switches per request. The faults and switches
are counted around the whole run, warm-up and the load generator's connects and closes included.

--pin puts the proxies on CPU 1 and the load generator and the backend on CPU 0, so the proxy's
latency is its own work and its own wake-ups, not the two cores' contention (`docs/profile.md`,
"The freshest connection first"). Nothing is asserted: the numbers are printed.

Usage: benches/paired.py [--pin | --workers N] [--rate 5000] [--seconds 5] [--rounds 10] [--saturate S] NAME=BINARY...
e.g.   benches/paired.py --pin before=/tmp/luma-proxy.old after=target/release/luma-proxy
"""
import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402  (its backend, nginx config, load generator and steal counter)

FIRST_PORT, FIRST_ADMIN = 18200, 18250
PROXY_CPU, LOAD_CPU = {1}, {0}


def on(cpus, pin):
    """A preexec_fn that pins the child to `cpus` (inherited by its threads and children)."""
    return (lambda: os.sched_setaffinity(0, cpus)) if pin else None


def start_luma(name, binary, i, tmp, pin, workers):
    """One luma-proxy build, routing 127.0.0.1 to the backend. Returns (proc, port)."""
    port, admin = FIRST_PORT + i, FIRST_ADMIN + i
    state = os.path.join(tmp, name)
    log = open(os.path.join(tmp, f"{name}.log"), "w")
    proc = subprocess.Popen([binary, "serve", "--http", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                             "--state-dir", state, "--no-access-log", "--workers", str(workers), "--allow-literal-targets",
                             "--https", "127.0.0.1:0", "--acme-directory", "off", "--metrics", "off"],
                            stdout=subprocess.DEVNULL, stderr=log, preexec_fn=on(PROXY_CPU, pin))
    C.wait_port(port, proc=proc)
    subprocess.run([binary, "deploy", "--admin", f"127.0.0.1:{admin}", "--state-dir", state, "--host", "127.0.0.1",
                    "--project", "bench", "--target", f"127.0.0.1:{C.BACKEND}"],
                   check=True, stdout=subprocess.DEVNULL, timeout=60)
    return proc, port


def minor_faults(pids):
    """Minor page faults the processes have taken so far (all their threads): a page the
    allocator gave back and touched again costs one, on the request path."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                total += int(f.read().rsplit(")", 1)[1].split()[7])
        except OSError:
            pass  # a process that ended: main() stops on a replaced nginx worker
    return total


def switches(pids):
    """Voluntary and involuntary context switches of all the processes' threads so far."""
    vol = invol = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # a process that ended: main() stops on a replaced nginx worker
        # A thread that ends takes its counts with it; the proxies run no short-lived threads
        # here (metrics and ACME are off).
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            vol += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches:"):
                            invol += int(line.split()[1])
            except OSError:
                pass  # a thread that ended meanwhile
    return vol, invol


def connects_during(pids, run):
    """run(), and the `connect` system calls the proxy made meanwhile (None without perf)."""
    if not shutil.which("perf"):
        return run(), None
    with tempfile.NamedTemporaryFile("r", suffix=".perf") as out:
        perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "syscalls:sys_enter_connect",
                                 "-p", ",".join(map(str, pids)), "-o", out.name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            result = run()
        finally:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=30)
        counts = [line.split(",")[0] for line in out if "connect" in line]
    return result, int(counts[0]) if counts and counts[0].isdigit() else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs="+", metavar="NAME=BINARY", help="luma-proxy builds to compare")
    ap.add_argument("--pin", action="store_true", help="proxies on CPU 1; load generator and backend on CPU 0")
    ap.add_argument("--rate", type=int, default=5000, help="requests per second (default 5000)")
    ap.add_argument("--seconds", type=int, default=5, help="measured seconds per run, after a 1 s warm-up")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=1, help="serving workers of every proxy (default 1)")
    ap.add_argument("--saturate", type=int, default=0, metavar="SECONDS",
                    help="before the rounds, saturate each contender with wrk (64 connections) for this long, "
                         "in 10 s runs taken in turns, as compare.py's saturation rounds do before its "
                         "fixed rate (default 0: a 1 s warm-up only)")
    a = ap.parse_args()
    builds = {}
    for b in a.builds:
        name, _, binary = b.partition("=")
        if not name or not binary or name == "nginx" or name in builds:
            ap.error(f"{b!r}: give each build as a new NAME=BINARY (nginx is always run)")
        if not os.access(binary, os.X_OK):
            ap.error(f"{binary}: not an executable")
        builds[name] = os.path.abspath(binary)
    if a.pin and (os.cpu_count() < 2 or a.workers > 1):
        ap.error("--pin needs two CPUs and 1 worker (it gives the proxy one CPU)")
    if a.rate < 1 or a.seconds < 1 or a.rounds < 1 or a.workers < 1:
        ap.error("--rate, --seconds, --rounds and --workers must be at least 1")
    if a.saturate < 0:
        ap.error("--saturate must not be negative")

    tmp = tempfile.mkdtemp(prefix="luma-paired-")
    procs, ports, nginx = {}, {}, None
    # The load generator is started by compare.loadgen; it is pinned by pinning this process,
    # whose children inherit it. The proxies are pinned apart when they start.
    if a.pin:
        os.sched_setaffinity(0, LOAD_CPU)
    backend = subprocess.Popen([f"{C.REL}/luma-demo-backend"],
                               env=dict(os.environ, PORT=str(C.BACKEND), BIND="127.0.0.1", DEMO_BODY_BYTES="1024"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    results = {}
    try:
        C.wait_port(C.BACKEND)
        for i, (name, binary) in enumerate(builds.items()):
            procs[name], ports[name] = start_luma(name, binary, i, tmp, a.pin, a.workers)
        nginx = C.Contender("nginx", a.workers, tempfile.mkdtemp(dir=tmp))
        nginx.start()
        if a.pin:
            for pid in nginx.pids():
                os.sched_setaffinity(pid, PROXY_CPU)
        ports["nginx"] = nginx.port
        names = list(ports)
        results = {n: [] for n in names}
        for n in names:
            C.wrk(ports[n], 1)  # 1 s: pools filled, caches hot
        for left in range(a.saturate, 0, -10):
            for n in random.sample(names, len(names)):
                C.wrk(ports[n], min(left, 10))
        for r in range(a.rounds):
            order = names[:]
            random.shuffle(order)
            for n in order:
                pids = nginx.pids() if n == "nginx" else [procs[n].pid]
                faults, (vol, invol) = minor_faults(pids), switches(pids)
                x, conn = connects_during(pids, lambda: C.loadgen(ports[n], a.rate, a.seconds))
                faults = minor_faults(pids) - faults
                vol, invol = (after - before for before, after in zip((vol, invol), switches(pids)))
                if n == "nginx" and sorted(nginx.pids()) != sorted(pids):
                    sys.exit("paired.py: an nginx worker was replaced during a run; its counts are wrong")
                requests = max(x["sent"] + x["warmup_s"] * a.rate, 1)  # the counters run through the warm-up
                results[n].append(dict(p50=x["p50_us"], p99=x["p99_us"], steal=x["steal_ms"], connects=conn,
                                       faults=faults, vol=vol / requests, invol=invol / requests))
                print(f"round {r + 1} {n}: p50 {x['p50_us']} µs, p99 {x['p99_us']} µs, "
                      f"steal {x['steal_ms']:.0f} ms, connects {conn}, minor faults {faults}, "
                      f"switches per request {vol / requests:.2f} voluntary, {invol / requests:.2f} not",
                      file=sys.stderr, flush=True)
    finally:
        for p in procs.values():
            p.terminate()
            p.wait()
        if nginx:
            nginx.stop()
        backend.terminate()
        backend.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{a.rate} req/s, {a.rounds} rounds of {a.seconds} s, {a.workers} worker(s), "
          f"{'pinned (proxies on CPU 1)' if a.pin else 'not pinned'}"
          f"{f', after {a.saturate} s of saturation each' if a.saturate else ''}")
    print("| contender | p50, median of rounds | p50 per round, µs | p99, median of rounds | p99 per round, ms "
          "| connects per run | minor faults per run, median | context switches per request, voluntary / not |")
    print("|---|---:|---|---:|---|---|---:|---:|")
    for n, xs in results.items():
        p99s = ", ".join(f"{x['p99'] / 1000:.2f}" for x in xs)
        print(f"| {n} | {statistics.median(x['p50'] for x in xs):.0f} µs | {', '.join(str(x['p50']) for x in xs)} "
              f"| {statistics.median(x['p99'] for x in xs) / 1000:.2f} ms | {p99s} "
              f"| {', '.join(str(x['connects']) for x in xs)} | {statistics.median(x['faults'] for x in xs):.0f} "
              f"| {statistics.median(x['vol'] for x in xs):.2f} / {statistics.median(x['invol'] for x in xs):.2f} |")
    names = list(results)
    for i, m in enumerate(names):
        for t in names[i + 1:]:
            d = [x["p50"] - y["p50"] for x, y in zip(results[m], results[t])]
            pairs = list(zip(results[m], results[t]))
            print(f"- {m} against {t}: p50 lower in {sum(v < 0 for v in d)} of {len(d)} rounds "
                  f"({sum(v == 0 for v in d)} ties), per-round difference ({m} - {t}) median "
                  f"{statistics.median(d):+.1f} µs; p99 lower in {sum(x['p99'] < y['p99'] for x, y in pairs)} of {len(d)} "
                  f"({sum(x['p99'] == y['p99'] for x, y in pairs)} ties), per-round ratio ({m} / {t}) median "
                  f"{statistics.median(x['p99'] / y['p99'] for x, y in pairs):.2f}")


if __name__ == "__main__":
    main()
