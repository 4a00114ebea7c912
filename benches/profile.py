#!/usr/bin/env python3
"""Instructions per request of luma-proxy, nginx and HAProxy, under callgrind: noise-free.

Wall-clock benchmarks (compare.py) need a quiet machine; instruction counts do not. Each
contender runs alone under `valgrind --tool=callgrind` with 1 worker, in front of the same
native backend (luma-demo-backend, 1 KiB body) and the configs of peers/, and serves:

  * a warm-up (pools filled, lazy statics done), after which its counters are zeroed;
  * exactly `--requests` requests from luma-loadgen (`--requests N`, closed loop,
    `--connections` keep-alive connections) for HTTP/1.1, or from `h2load -n N` for h2c;
  * then a dump: user-space instructions of every thread, divided by the request count.

Kernel work is not in these counts: `--syscalls` runs each contender natively under
`strace -c -f` for the same request count and reports system calls per request instead.

Output: a table on stdout, and per contender the callgrind file plus the inclusive and
exclusive function lists (callgrind_annotate) in --out-dir. Only 127.0.0.1 is used; ports are
19100-19199 so that compare.py (181xx) can run at the same time.

Usage: benches/profile.py [--requests 20000] [--connections 64] [--contenders luma-proxy,nginx,haproxy]
                          [--proto h1|h2] [--luma PATH] [--syscalls] [--env KEY=VALUE] [--out-dir DIR]
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from compare import wait_port  # benches/compare.py, beside this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
BACKEND = 19100
PORTS = {"luma-proxy": 19101, "nginx": 19102, "haproxy": 19103}
H2_PORTS = {"luma-proxy": 19101, "nginx": 19112, "haproxy": 19113}
ADMIN, LUMA_HTTPS = 19191, 19192
WARMUP = 2000


def render(template, values):
    with open(os.path.join(ROOT, template)) as f:
        text = f.read()
    for k, v in values.items():
        text = text.replace("{" + k + "}", str(v))
    return text


def command(name, tmp, luma):
    """The contender's command line (1 worker, in the foreground) and its signal to stop."""
    fmt = dict(workers=1, tmp=tmp, port=PORTS[name], h2_port=H2_PORTS[name], backend_port=BACKEND)
    if name == "luma-proxy":
        return [luma, "serve", "--http", f"127.0.0.1:{PORTS[name]}", "--https", f"127.0.0.1:{LUMA_HTTPS}",
                "--acme-directory", "off", "--admin", f"127.0.0.1:{ADMIN}", "--state-dir", os.path.join(tmp, "state"),
                "--no-access-log", "--workers", "1", "--allow-literal-targets"], signal.SIGTERM
    if name == "nginx":
        os.makedirs(os.path.join(tmp, "body"), exist_ok=True)
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(render("benches/peers/nginx.conf.in", fmt))
        # One process: the worker's work is done by the process valgrind watches.
        return ["nginx", "-p", tmp, "-c", conf, "-g", "daemon off; master_process off;"], signal.SIGQUIT
    if name == "haproxy":
        conf = os.path.join(tmp, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(render("benches/peers/haproxy.cfg.in", fmt))
        return ["haproxy", "-db", "-f", conf], signal.SIGTERM
    raise ValueError(name)


def start(name, tmp, luma, wrap, env=None):
    cmd, stop_sig = command(name, tmp, luma)
    log = open(os.path.join(tmp, f"{name}.log"), "w")
    proc = subprocess.Popen(wrap + cmd, stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ, **(env or {})))
    try:
        wait_port(PORTS[name], timeout=120.0, proc=proc)
        if name == "luma-proxy":
            subprocess.run([luma, "deploy", "--admin", f"127.0.0.1:{ADMIN}", "--state-dir", os.path.join(tmp, "state"),
                            "--host", "127.0.0.1", "--project", "bench", "--target", f"127.0.0.1:{BACKEND}"],
                           check=True, stdout=subprocess.DEVNULL, timeout=120)
    except Exception:
        stop(proc, stop_sig)
        raise
    return proc, stop_sig


def stop(proc, sig):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def load(name, proto, requests, connections):
    """Sends exactly `requests` requests; raises unless every one got a 2xx."""
    if proto == "h1":
        out = subprocess.run([f"{REL}/luma-loadgen", "--addr", f"127.0.0.1:{PORTS[name]}", "--host", "127.0.0.1",
                              "--connections", str(connections), "--rate", "0", "--duration", "600",
                              "--requests", str(requests)], capture_output=True, text=True, check=True).stdout
        import json
        r = json.loads(out)
        if r["ok"] != requests:
            raise RuntimeError(f"{name}: {r['ok']} of {requests} requests succeeded: {out}")
        return
    # h2c with prior knowledge: 16 connections x 4 streams, as compare.py's h2c row.
    out = subprocess.run(["h2load", "-n", str(requests), "-c", "16", "-m", "4", "-t", "1",
                          f"http://127.0.0.1:{H2_PORTS[name]}/"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded", out)
    if not m or int(m.group(2)) != requests or "Application protocol: h2c" not in out:
        raise RuntimeError(f"{name}: h2load did not get {requests} h2c answers:\n{out[-1200:]}")


def callgrind_run(name, proto, a, tmp):
    out = os.path.join(a.out_dir, f"callgrind.{name}.{proto}")
    for f in os.listdir(a.out_dir):
        if f.startswith(os.path.basename(out)):
            os.remove(os.path.join(a.out_dir, f))
    wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-line=no"]
    if a.cache_sim:
        wrap.append("--cache-sim=yes")
    proc, sig = start(name, tmp, a.luma, wrap, a.env)
    try:
        load(name, proto, WARMUP, a.connections)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        load(name, proto, a.requests, a.connections)
        subprocess.run(["callgrind_control", "--dump=measured", str(proc.pid)], check=True, capture_output=True)
    finally:
        stop(proc, sig)
    dumps = sorted(f for f in os.listdir(a.out_dir) if f.startswith(os.path.basename(out) + "."))
    measured = None
    for f in dumps:
        with open(os.path.join(a.out_dir, f)) as fh:
            head = fh.read(4096)
        if "measured" in head:
            measured = os.path.join(a.out_dir, f)
    if not measured:
        raise RuntimeError(f"{name}: no 'measured' dump among {dumps}")
    final = out + ".measured"
    os.replace(measured, final)
    for f in dumps:
        p = os.path.join(a.out_dir, f)
        if os.path.exists(p):
            os.remove(p)
    total, events = [], []
    with open(final) as fh:
        for line in fh:
            if line.startswith("events:"):
                events = line.split()[1:]
            if line.startswith(("summary:", "totals:")):
                total = [int(x) for x in line.split()[1:]]
    for inclusive in ("yes", "no"):
        r = subprocess.run(["callgrind_annotate", f"--inclusive={inclusive}", "--threshold=99", final],
                           capture_output=True, text=True)
        with open(f"{final}.{'inclusive' if inclusive == 'yes' else 'self'}.txt", "w") as fh:
            fh.write(r.stdout)
    per = {e: t / a.requests for e, t in zip(events, total)}
    if a.cache_sim:
        # Simulated first-level misses (instruction, data read, data write) and last-level ones.
        print(f"{name}: per request " + ", ".join(f"{e} {v:,.1f}" for e, v in per.items()), file=sys.stderr)
    return per.get("Ir", 0.0)


def syscall_run(name, proto, a, tmp):
    proc, sig = start(name, tmp, a.luma, [], a.env)
    try:
        load(name, proto, WARMUP, a.connections)
        trace = os.path.join(tmp, f"{name}.strace")
        st = subprocess.Popen(["strace", "-c", "-f", "-o", trace, "-p", str(proc.pid)], stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # strace attaches to every thread
        load(name, proto, a.requests, a.connections)
        st.send_signal(signal.SIGINT)
        st.wait(timeout=30)
    finally:
        stop(proc, sig)
    text = open(trace).read()
    m = re.search(r"^-+.*\n\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*total", text, re.M)
    calls = int(m.group(1)) if m else 0
    per = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            per[f[-1]] = int(f[3])
    return calls / a.requests, {k: v / a.requests for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:6]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--contenders", default="luma-proxy,nginx,haproxy")
    ap.add_argument("--proto", choices=["h1", "h2"], default="h1")
    ap.add_argument("--body-bytes", type=int, default=1024, help="the backend's response body size")
    ap.add_argument("--luma", default=f"{REL}/luma-proxy", help="the luma-proxy binary (to compare builds)")
    ap.add_argument("--syscalls", action="store_true", help="count system calls (strace -c) instead of instructions")
    ap.add_argument("--cache-sim", action="store_true", help="also simulate the caches (callgrind's I1/D1/LL misses, on stderr)")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "target", "profile"))
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set in the contenders' environment (e.g. LD_PRELOAD=... to try another allocator)")
    a = ap.parse_args()
    a.env = dict(kv.split("=", 1) for kv in a.env)
    os.makedirs(a.out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="luma-profile-")
    backend = subprocess.Popen([f"{REL}/luma-demo-backend"],
                               env=dict(os.environ, PORT=str(BACKEND), BIND="127.0.0.1", DEMO_BODY_BYTES=str(a.body_bytes)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        wait_port(BACKEND, timeout=120.0, proc=backend)
        for name in a.contenders.split(","):
            d = tempfile.mkdtemp(dir=tmp)
            if a.syscalls:
                per, top = syscall_run(name, a.proto, a, d)
                rows.append((name, per, ", ".join(f"{k} {v:.2f}" for k, v in top.items())))
            else:
                rows.append((name, callgrind_run(name, a.proto, a, d), ""))
            print(f"{name}: {rows[-1][1]:,.1f}", file=sys.stderr)
    finally:
        backend.terminate()
        backend.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    what = "system calls" if a.syscalls else "instructions (user space)"
    print(f"| contender ({a.proto}, {a.body_bytes:,}-byte body, {a.requests:,} requests, {a.connections} connections) | {what} per request |"
          + (" top calls per request |" if a.syscalls else ""))
    print("|---|---:|" + ("---|" if a.syscalls else ""))
    for name, per, top in rows:
        print(f"| {name} | {per:,.{2 if a.syscalls else 0}f} |" + (f" {top} |" if a.syscalls else ""))


if __name__ == "__main__":
    main()
