#!/usr/bin/env python3
"""Takes each CPU away from everything else for a few milliseconds at a time, for a bounded time:
a stand-in for a hypervisor's steal, which the AMD EPYC VMs of stops 35 and 37 had in every
fixed-rate run and stop 38's Intel VM mostly did not.

Why: luma-proxy's fixed-rate p99 with 1 worker was above nginx's in every AMD record, and below
it on stop 38's Intel VM, where the harnesses' other differences did not move it
(`docs/profile.md`, "The 1-worker p99 and the VM"). Steal cannot be made on demand, but a
busy loop at real-time priority, pinned to a CPU, stalls every other thread on that CPU the same
way: nothing else runs there until it sleeps. One such loop per CPU, their phases spread, runs
`--burst` ms in every `--period` ms, for `--seconds`, then exits (also on SIGTERM or SIGINT).

Needs root (SCHED_FIFO). The kernel's real-time throttling (`sched_rt_runtime_us`, 95 % by
default) bounds it anyway. Run it beside `benches/paired.py`, e.g.
    benches/stalls.py --burst 2 --period 50 --seconds 600 & benches/paired.py ...
"""
import argparse
import os
import signal
import sys
import time


def stall(cpu, burst_s, period_s, offset_s, until):
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    tick = time.monotonic() + offset_s
    while tick < until:
        # Sleep to the next tick, then spin: the spin is the stall.
        delay = tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        end = time.monotonic() + burst_s
        while time.monotonic() < end:
            pass
        tick += period_s
    os._exit(0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burst", type=float, default=2.0, help="ms each stall lasts (default 2)")
    ap.add_argument("--period", type=float, default=50.0, help="ms from one stall to the next on a CPU (default 50)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60, at most 3600)")
    a = ap.parse_args()
    if not (0 < a.burst < a.period) or not (0 < a.seconds <= 3600):
        ap.error("need 0 < --burst < --period and 0 < --seconds <= 3600")
    cpus = sorted(os.sched_getaffinity(0))
    until = time.monotonic() + a.seconds
    children = []
    for i, cpu in enumerate(cpus):
        pid = os.fork()
        if pid == 0:
            try:
                stall(cpu, a.burst / 1000, a.period / 1000, a.period / 1000 * i / len(cpus), until)
            except BaseException as e:  # noqa: BLE001 - a child must never return into the parent's code
                print(f"stalls.py: CPU {cpu}: {e}", file=sys.stderr)
                os._exit(1)
        children.append(pid)

    def stop(_signum, _frame):
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    for pid in children:
        while True:
            try:
                _, st = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                st = 0
                break
        status = status or os.waitstatus_to_exitcode(st)
    print(f"stalls.py: {a.burst} ms in every {a.period} ms on CPUs {cpus}, {a.seconds} s", file=sys.stderr)
    return 1 if status > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
