#!/usr/bin/env python3
"""Takes each CPU away from everything else for a few milliseconds at a time, for a bounded time:
a stand-in for a hypervisor's steal, which the AMD EPYC VMs of stops 35 and 37 had in nearly every
fixed-rate run and stop 38's Intel VM mostly did not.

Why: luma-proxy's fixed-rate p99 with 1 worker was above nginx's in every AMD record, and below
it on stop 38's Intel VM, where the harnesses' other differences did not move it
(`docs/profile.md`, "The 1-worker p99 and the VM"). Steal cannot be made on demand, but a
busy loop at real-time priority, pinned to a CPU, holds that CPU: no thread of normal priority
runs there until it sleeps. One such loop per CPU, their phases spread, runs `--burst` ms in
every `--period` ms (at most half of it), for `--seconds`, then exits; it also exits on SIGTERM or
SIGINT, and a loop whose parent is gone stops at its next tick.

It is weaker than steal, which the guest cannot see: the guest's scheduler sees this loop, so a
thread that wakes while its CPU is held can be placed on the other CPU, which is free. Only
threads pinned to a CPU (`paired.py --pin`) wait out every stall. Interrupts still run.

Needs root (SCHED_FIFO). Run it beside `benches/paired.py`, e.g.
    benches/stalls.py --burst 2 --period 50 --seconds 600 & benches/paired.py ...
"""
import argparse
import os
import signal
import sys
import time


def stall(cpu, burst_s, period_s, offset_s, until, parent):
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    tick = time.monotonic() + offset_s
    while tick < until and os.getppid() == parent:
        # Sleep to the next tick, then spin: the spin is the stall.
        delay = tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        end = time.monotonic() + burst_s
        while time.monotonic() < end:
            pass
        tick += period_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burst", type=float, default=2.0, help="ms each stall lasts (default 2)")
    ap.add_argument("--period", type=float, default=50.0, help="ms from one stall to the next on a CPU (default 50)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60, at most 3600)")
    a = ap.parse_args()
    if not (0 < a.burst <= a.period / 2) or not (0 < a.seconds <= 3600):
        ap.error("need 0 < --burst <= --period / 2 and 0 < --seconds <= 3600")
    cpus = sorted(os.sched_getaffinity(0))
    start = time.monotonic()
    until = start + a.seconds
    parent = os.getpid()
    stopped = []

    def stop(_signum, _frame):
        stopped.append(True)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    children = []
    # Installed before the forks, so a signal never finds children it cannot stop; the children
    # ignore both and are stopped by the parent alone.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i, cpu in enumerate(cpus):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                stall(cpu, a.burst / 1000, a.period / 1000, a.period / 1000 * i / len(cpus), until, parent)
                code = 0
            except BaseException as e:  # noqa: BLE001 - a child never returns into the parent's code
                try:
                    print(f"stalls.py: CPU {cpu}: {e!r}", file=sys.stderr)
                finally:
                    os._exit(code)
            os._exit(code)
        children.append(pid)
        if stopped:
            stop(None, None)
    failed = 0
    for pid in children:
        _, st = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(st)
        # A loop killed by stop() ended as asked; any other end but 0 is a failure.
        if code != 0 and not (stopped and code == -signal.SIGKILL):
            failed += 1
    print(f"stalls.py: {a.burst} ms in every {a.period} ms on CPUs {cpus}, for {time.monotonic() - start:.1f} s"
          f"{' (stopped)' if stopped else ''}{f', {failed} loop(s) failed' if failed else ''}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
