#!/usr/bin/env python3
"""What sets the tail at a fixed rate: every task's long holds of a CPU, laid over each slow request.

`compare.py` finds luma-proxy's p99 at half of nginx's saturation rate level with nginx's, round
to round, and `scale.py` finds both proxies' p99 growing alike with the host's idle containers.
This harness asks what the slow requests have in common. It runs luma-proxy and nginx (1 worker
each, natively, in front of the same 1 KiB backend on 127.0.0.1, configured as in `compare.py`) in
paired rounds at a fixed rate, with `luma-loadgen --records --warmup` (each request's due time and
latency, after the same warm-up as `compare.py`), while `perf record` takes the scheduler's
switches of every task but the load generator, the backend and the idle loop (a kernel filter
keeps only those, so the trace is a few thousand events a second, not the load's hundreds of
thousands). From the switches it knows when each task held a CPU: the host's (kdamond, kworkers,
Docker's daemons, ...) and the proxies' own threads, and for those also when one waited for a CPU
after being preempted. Per run it reports:
  * the share of the requests slower than the run's own p99 that were due while, or within 5 ms
    after, a hold (or a proxy's wait) of 1 ms or more, beside the same share of all requests:
    exposure is by due time alone, so where the first share is many times the second, those
    holds set the tail;
  * the p99 of the requests due clear of every long hold, the longest holds and slowest requests
    (times from the run's first due request), the steal time (`/proc/stat`: the hypervisor's
    stalls, which no task here sees), and each process's CPU time per request sent.

It does this as the machine is, then with `--idle N` containers of the demo image started with
`--network none` (no network, no traffic: the host's cost of N containers, as in `scale.py`'s
host control), named `luma-hosttail-<pid>-NNN` and removed at the end, also on failure.

Usage: benches/host_tail.py [--rounds 4] [--seconds 10] [--idle 199] [--rate R] [--out F.json]
Needs root for `perf record -a` with a tracepoint filter, the release binaries (`cargo build
--release -p luma-proxy -p luma-demo-backend -p luma-benches`), nginx, wrk, and with `--idle` the
image `luma-demo:dev` (`docker/build-images.sh`). Nothing is asserted; the numbers are reported.
"""
import argparse
import bisect
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (Contender, wrk and the ports: the same setup as the comparison)

NAMES = ["luma-proxy", "nginx"]
# The tasks left out of the trace (threads are matched by their comm: the backend starts a thread
# per connection, so pids would not do): the load generator, the backend's threads, and the idle
# loop. The idle containers of `--idle` run the same backend binary, asleep in `accept`, and are
# left out with it; their containerd shims are not. Every other task's switches are kept: the
# host's tasks, and the proxies' own threads, whose long runs and long waits for a CPU are told
# apart from the host's holds.
UNTRACED = ["luma-loadgen", "luma-demo-*", "swapper*"]
# luma-proxy's threads: its serving workers, its main thread, its access log writer and tokio's
# blocking pool (DNS look-ups); the load generator names its own threads `luma-loadgen`.
PROXY = {"luma-worker-": "luma-proxy", "luma-proxy": "luma-proxy", "access-log": "luma-proxy",
         "tokio-runtime-w": "luma-proxy", "nginx": "nginx"}
LONG_S = 0.001  # a hold of a CPU, or a wait for one, that counts as long: 1 ms
# How long after a long hold a request due then still counts as exposed to it: the backlog a
# stall leaves takes about as long again to drain at half the saturation rate. (Measured while
# the load generator still sent each millisecond's requests together, up to 1 ms late.)
AFTER_S = 0.005


def traced(field):
    # This kernel's filters take `~` (a glob) but not `!~`: the negation is of the whole group.
    return "!(" + " || ".join(f'{field} ~ "{p}"' for p in UNTRACED) + ")"


def perf_start(path):
    flt = f"{traced('prev_comm')} || {traced('next_comm')}"
    log = path + ".log"
    p = subprocess.Popen(["perf", "record", "-q", "-a", "-k", "mono", "-e", "sched:sched_switch",
                          "--filter", flt, "-o", path], stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    time.sleep(1.0)  # perf opens its events before the first run starts
    if p.poll() is not None:
        raise RuntimeError(f"perf record failed: {open(log).read()[-500:]}")
    return p


def perf_stop(p):
    """Stops perf so that it writes its file; a perf that does not stop is killed: a system-wide
    trace must never outlive the run."""
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise RuntimeError("perf record did not stop within 60 s of SIGINT; killed")


def field(text, name):
    return text.split(name + "=", 1)[1].split(" ", 1)[0]


def holds(path):
    """[(start_s, end_s, family)] from perf's switches, on the monotonic clock: when each traced
    task held a CPU ("<family>"), and, for the proxies' threads, when one waited for a CPU after
    being preempted ("<proxy> waiting") or slept uninterruptibly ("<proxy> blocked")."""
    out = subprocess.run(["perf", "script", "-i", path, "-F", "cpu,time,trace"], capture_output=True,
                         text=True, check=True).stdout
    on_cpu, off_cpu, found = {}, {}, []
    for line in out.splitlines():
        # "[001] 1234.567890: prev_comm=X prev_pid=1 prev_prio=120 prev_state=S ==> next_comm=Y next_pid=2 next_prio=120"
        try:
            cpu_part, rest = line.split("]", 1)
            t_part, trace = rest.split(":", 1)
            cpu, t = int(cpu_part.strip(" [")), float(t_part)
            prev, nxt = trace.split("==>")
            prev_comm = prev.split(" prev_pid=")[0].split("prev_comm=")[1]
            next_comm = nxt.split(" next_pid=")[0].split("next_comm=")[1]
            prev_pid, next_pid, state = int(field(prev, "prev_pid")), int(field(nxt, "next_pid")), field(prev, "prev_state")
        except (ValueError, IndexError):
            continue
        start = on_cpu.pop(cpu, None)
        if start is not None and start[1] == prev_pid:
            found.append((start[0], t, family(prev_comm)))
        if proxy(prev_comm) and state[:1] in ("R", "D"):
            off_cpu[prev_pid] = (t, f"{proxy(prev_comm)} {'waiting' if state[0] == 'R' else 'blocked'}")
        if not untraced(next_comm):
            on_cpu[cpu] = (t, next_pid)
            waited = off_cpu.pop(next_pid, None)
            if waited is not None:
                found.append((waited[0], t, waited[1]))
    found.sort()
    return found


def untraced(comm):
    return any(comm.startswith(p[:-1]) if p.endswith("*") else comm == p for p in UNTRACED)


def proxy(comm):
    return next((name for prefix, name in PROXY.items() if comm.startswith(prefix)), None)


def family(comm):
    """Tasks grouped as the reports name them."""
    if proxy(comm):
        return f"{proxy(comm)} running"
    for prefix, name in (("kdamond", "kdamond"), ("containerd", "containerd"), ("dockerd", "dockerd"),
                         ("docker-", "dockerd"), ("kworker", "kworker"), ("ksoftirqd", "ksoftirqd"),
                         ("process_api", "process_api"), ("perf", "perf (this trace)")):
        if comm.startswith(prefix):
            return name
    return "other"


def records(path, offset):
    """[(due_s, latency_s)] on the monotonic clock (offset: realtime - monotonic), from
    `--records-us` lines: every request, failures too (their latency is to the failure)."""
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                out.append((int(parts[0]) / 1e6 - offset, int(parts[1]) / 1e6))
    return out


def attribute(reqs, found):
    """Per run: its p99; the share of the requests slower than it (strictly), and of all requests, that were
    due during or within `AFTER_S` after a long hold of a CPU by a host task (any, and per family);
    and the p99 of the requests due clear of every long hold. Exposure is by due time alone, not by
    how long a request took, so a slow request is no likelier to count as exposed for being slow:
    if the holds had nothing to do with the tail, both shares would be alike."""
    if not reqs:
        return None
    lats = sorted(l for _, l in reqs)
    p99 = lats[round(0.99 * (len(lats) - 1))]
    t0, t1 = reqs[0][0] - AFTER_S, max(d + l for d, l in reqs)
    longs = [h for h in found if h[1] - h[0] >= LONG_S and h[1] > t0 and h[0] < t1]
    starts = [h[0] for h in longs]
    max_len = max((h[1] - h[0] for h in longs), default=0)

    def exposed(d):
        """The families of the long holds that began before `d` and ended after `d - AFTER_S`."""
        lo = bisect.bisect_left(starts, d - AFTER_S - max_len)
        hi = bisect.bisect_left(starts, d)
        return {longs[i][2] for i in range(lo, hi) if longs[i][1] > d - AFTER_S}

    fams = ["any", "host"] + sorted({h[2] for h in longs})
    slow_hit, all_hit, clear, n_slow = dict.fromkeys(fams, 0), dict.fromkeys(fams, 0), [], 0
    for d, l in reqs:
        hit = exposed(d)
        slow = l > p99
        n_slow += slow
        if not hit:
            clear.append(l)
            continue
        if any(not f.startswith(tuple(PROXY.values())) for f in hit):
            hit.add("host")
        for f in {"any"} | hit:
            all_hit[f] += 1
            slow_hit[f] += slow
    clear.sort()
    return {"requests": len(reqs), "p99_ms": p99 * 1e3, "max_ms": lats[-1] * 1e3, "slow": n_slow,
            "long_holds": len(longs), "long_hold_ms": sum(h[1] - h[0] for h in longs) * 1e3,
            "longest_ms": max_len * 1e3,
            "longest": [[round((h[0] - reqs[0][0]) * 1e3, 1), round((h[1] - h[0]) * 1e3, 2), h[2]]
                        for h in sorted(longs, key=lambda h: h[0] - h[1])[:5]],
            "slowest": [[round((d - reqs[0][0]) * 1e3, 1), round(l * 1e3, 2)]
                        for d, l in sorted(reqs, key=lambda x: -x[1])[:5]],
            "slow_share": {f: slow_hit[f] / max(n_slow, 1) for f in fams},
            "all_share": {f: all_hit[f] / len(reqs) for f in fams},
            "p99_clear_ms": clear[round(0.99 * (len(clear) - 1))] * 1e3 if clear else None,
            "holds_by_family_ms": {f: sum(h[1] - h[0] for h in longs if h[2] == f) * 1e3 for f in fams[2:]},
            "holds_by_family": {f: sum(1 for h in longs if h[2] == f) for f in fams[2:]}}


def idle_containers(n, prefix, image, made):
    """Starts n idle containers; each name goes into `made` as soon as its container exists, so
    a failure or a signal part way leaves nothing behind. A name already taken fails `docker
    create` and is not added: that container is not ours."""
    for i in range(1, n + 1):
        name = f"{prefix}-{i:03d}"
        subprocess.run(["docker", "create", "--name", name, "--network", "none",
                        "--label", f"luma-hosttail={prefix}", image], check=True, stdout=subprocess.DEVNULL)
        made.append(name)
        subprocess.run(["docker", "start", name], check=True, stdout=subprocess.DEVNULL)
        if i % 50 == 0:
            print(f"  {i} of {n} idle containers started", file=sys.stderr)


def remove(names):
    for i in range(0, len(names), 20):
        subprocess.run(["docker", "rm", "-f", *names[i:i + 20]], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def condition(label, cs, rate, a, tmp, pids):
    """`a.rounds` paired rounds under perf, each contender's order shuffled per round."""
    trace = os.path.join(tmp, f"{label}.perf")
    runs = {n: [] for n in NAMES}
    offset = time.time() - time.monotonic()
    p = perf_start(trace)
    try:
        for r in range(a.rounds):
            for name in random.Random(r).sample(NAMES, len(NAMES)):
                rec = os.path.join(tmp, f"{label}-{name}-{r}.txt")
                cpu0 = {k: compare.cpu_seconds(v) for k, v in pids.items()}
                run = compare.loadgen(cs[name].port, rate, a.seconds, records=rec)
                cpu = {k: compare.cpu_seconds(v) - cpu0[k] for k, v in pids.items()}
                cpu["luma-loadgen"] = run["loadgen_cpu_s"]
                runs[name].append((rec, run["steal_ms"], cpu))
    finally:
        perf_stop(p)
    found = holds(trace)
    out = {}
    for name in NAMES:
        out[name] = []
        for rec, steal, cpu in runs[name]:
            r = attribute(records(rec, offset), found) or {}
            # The CPU was taken over the warm-up too: per request sent, at the same rate.
            sent = r.get("requests", 0) * (a.seconds + compare.FIXED_WARMUP_S) / a.seconds
            # CPU time per request of each process over the run (the idle contender's too): a
            # round where all of them cost more ran on a slower machine, not a slower proxy.
            r.update(steal_ms=steal,
                     cpu_us_per_request={k: v / max(sent, 1) * 1e6 for k, v in cpu.items()})
            out[name].append(r)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--idle", type=int, default=199, help="idle containers of the second condition (0: none)")
    ap.add_argument("--image", default="luma-demo:dev")
    ap.add_argument("--rate", type=int, help="requests/s (default: half of nginx's saturation rate)")
    ap.add_argument("--out", default="-")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="luma-hosttail-")
    backend = subprocess.Popen([f"{compare.REL}/luma-demo-backend"],
                               env=dict(os.environ, PORT=str(compare.BACKEND), BIND="127.0.0.1", DEMO_BODY_BYTES="1024"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # SIGTERM or a closed terminal ends the run through the `finally` below, as Ctrl-C does.
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    cs, idle, result = {}, [], {}
    try:
        compare.wait_port(compare.BACKEND)
        for name in NAMES:
            cs[name] = compare.Contender(name, 1, tempfile.mkdtemp(dir=tmp))
            cs[name].start()
            compare.wrk(cs[name].port, 1)
        rate = a.rate or int(compare.wrk(cs["nginx"].port, 5)[0] / 2)
        result = {"rate": rate, "rounds": a.rounds, "seconds": a.seconds, "kernel": os.uname().release,
                  "long_hold_ms": LONG_S * 1e3}
        print(f"rate {rate} req/s", file=sys.stderr)
        pids = {name: c.pids() for name, c in cs.items()}
        pids["luma-demo-backend"] = compare.tree_pids(backend.pid)
        result["as is"] = condition("asis", cs, rate, a, tmp, pids)
        if a.idle:
            idle_containers(a.idle, f"luma-hosttail-{os.getpid()}", a.image, idle)
            result[f"{a.idle} idle containers"] = condition("idle", cs, rate, a, tmp, pids)
    finally:
        # The clean-up runs to its end: a second Ctrl-C or signal does not cut it short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        remove(idle)
        for c in cs.values():
            c.stop()
        backend.terminate()
        backend.wait()
        subprocess.run(["rm", "-rf", tmp])
    text = json.dumps(result, indent=1)
    if a.out == "-":
        print(text)
    else:
        open(a.out, "w").write(text)
    summary(result)


def summary(result):
    """Per condition and proxy: median p99s over the runs, and the exposure shares pooled over
    them (the runs' slow requests together, and all their requests together)."""
    for label, runs in result.items():
        if not isinstance(runs, dict):
            continue
        print(f"\n{label} (at {result['rate']} req/s, {result['rounds']} rounds of {result['seconds']} s):",
              file=sys.stderr)
        for name, rs in runs.items():
            rs = [r for r in rs if r.get("requests")]
            if not rs:
                continue
            med = lambda k: statistics.median(r[k] for r in rs)
            fams = sorted({f for r in rs for f in r["slow_share"]}, key=lambda f: (f not in ("any", "host"), f))
            slow = sum(r["slow"] for r in rs)
            reqs = sum(r["requests"] for r in rs)
            pooled = lambda f: (sum(r["slow_share"].get(f, 0) * r["slow"] for r in rs) / max(slow, 1),
                                sum(r["all_share"].get(f, 0) * r["requests"] for r in rs) / max(reqs, 1))
            print(f"  {name}: p99 {med('p99_ms'):.2f} ms (runs {min(r['p99_ms'] for r in rs):.2f}-"
                  f"{max(r['p99_ms'] for r in rs):.2f}), of the requests due clear of long holds "
                  f"{statistics.median(r['p99_clear_ms'] for r in rs if r['p99_clear_ms'] is not None):.2f} ms; max {med('max_ms'):.1f} ms; {med('long_holds'):.0f} long holds a run; "
                  f"steal in {sum(1 for r in rs if r['steal_ms'])} of {len(rs)} runs", file=sys.stderr)
            print("    due during or 5 ms after a long hold, slower than p99 against all: "
                  + ", ".join(f"{f} {pooled(f)[0]:.1%} against {pooled(f)[1]:.1%}" for f in fams), file=sys.stderr)


if __name__ == "__main__":
    main()
