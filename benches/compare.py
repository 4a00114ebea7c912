#!/usr/bin/env python3
"""Throughput and latency of luma-proxy side by side with nginx, HAProxy and Caddy.

Every contender proxies to the same 1 KiB keep-alive backend on 127.0.0.1, with the same worker
count, no access logs and the same forwarded headers (peers/ holds each config with its reasons).
For each worker count (1 and 2):
  * saturation: wrk, 64 keep-alive connections, median of the runs;
  * fixed rate: luma-loadgen at half of nginx's saturation rate, for p50/p99/p99.9;
  * CPU-seconds per 1,000 requests (from /proc, all of a contender's processes) and peak RSS.
A "direct" run (no proxy) gives the ceiling. Nothing is asserted: the numbers are reported.

Usage: benches/compare.py [--smoke] [--out docs/benchmarks.md]
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
BACKEND = 18100
PORTS = {"luma-proxy": 18101, "nginx": 18102, "haproxy": 18103, "caddy": 18104}
ADMIN = 18191
CLK = os.sysconf("SC_CLK_TCK")


def render(template_path, values):
    """Fills {name} placeholders; the configs' own braces stay as they are."""
    with open(os.path.join(ROOT, template_path)) as f:
        text = f.read()
    for k, v in values.items():
        text = text.replace("{" + k + "}", str(v))
    return text


def wait_port(port, timeout=10.0):
    import socket
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def tree_pids(pid):
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return pids


def cpu_seconds(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / CLK


def peak_rss_mib(pids):
    kib = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                m = re.search(r"VmHWM:\s+(\d+)", f.read())
            kib += int(m.group(1)) if m else 0
        except OSError:
            pass
    return kib / 1024


class Contender:
    def __init__(self, name, workers, tmp):
        self.name, self.workers, self.tmp, self.proc = name, workers, tmp, None
        self.port = PORTS.get(name, BACKEND)

    def start(self):
        n, tmp, port = self.workers, self.tmp, self.port
        fmt = dict(workers=n, tmp=tmp, port=port, backend_port=BACKEND)
        env = dict(os.environ)
        if self.name == "luma-proxy":
            state = os.path.join(tmp, "luma-state")
            cmd = [f"{REL}/luma-proxy", "serve", "--http", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{ADMIN}",
                   "--state-dir", state, "--no-access-log", "--workers", str(n),
                   # The bench backend is a loopback ip:port, not an alias in a project network.
                   "--allow-literal-targets"]
        elif self.name == "nginx":
            os.makedirs(os.path.join(tmp, "body"), exist_ok=True)
            conf = os.path.join(tmp, "nginx.conf")
            open(conf, "w").write(render("benches/peers/nginx.conf.in", fmt))
            cmd = ["nginx", "-p", tmp, "-c", conf, "-g", "daemon off;"]
        elif self.name == "haproxy":
            conf = os.path.join(tmp, "haproxy.cfg")
            open(conf, "w").write(render("benches/peers/haproxy.cfg.in", fmt))
            cmd = ["haproxy", "-db", "-f", conf]
        elif self.name == "caddy":
            conf = os.path.join(tmp, "Caddyfile")
            open(conf, "w").write(render("benches/peers/Caddyfile.in", fmt))
            env["GOMAXPROCS"] = str(n)
            env["HOME"] = tmp
            env["XDG_DATA_HOME"] = tmp
            env["XDG_CONFIG_HOME"] = tmp
            cmd = ["caddy", "run", "--config", conf, "--adapter", "caddyfile"]
        else:
            return  # direct: the backend is already running
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"{self.name}.log"), "w"))
        wait_port(port)
        if self.name == "luma-proxy":
            subprocess.run([f"{REL}/luma-proxy", "deploy", "--admin", f"127.0.0.1:{ADMIN}", "--state-dir", state,
                            "--host", "127.0.0.1", "--project", "bench", "--target", f"127.0.0.1:{BACKEND}"],
                           check=True, stdout=subprocess.DEVNULL)

    def pids(self):
        return tree_pids(self.proc.pid) if self.proc else []

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM if self.name != "nginx" else signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wrk(port, seconds):
    out = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return rps, reqs, errors + non2xx


def loadgen(port, rate, seconds):
    out = subprocess.run([f"{REL}/luma-loadgen", "--addr", f"127.0.0.1:{port}", "--host", "127.0.0.1",
                          "--connections", "64", "--rate", str(rate), "--duration", str(seconds)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def version(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "not installed"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="1 s runs, 1 repeat, 1 worker: checks the harness, not speed")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    a = ap.parse_args()
    seconds, repeats, worker_counts = (1, 1, [1]) if a.smoke else (a.seconds, a.repeats, [1, 2])
    names = ["direct", "luma-proxy", "nginx", "haproxy"] + (["caddy"] if shutil.which("caddy") else [])
    tmp = tempfile.mkdtemp(prefix="luma-bench-")
    backend = subprocess.Popen([f"{REL}/luma-demo-backend"], env=dict(os.environ, PORT=str(BACKEND), BIND="127.0.0.1", DEMO_BODY_BYTES="1024"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    try:
        wait_port(BACKEND)
        for n in worker_counts:
            for name in names:
                c = Contender(name, n, tempfile.mkdtemp(dir=tmp))
                c.start()
                try:
                    wrk(c.port, 1)  # warm-up: pools filled, caches hot
                    pids = c.pids() if name != "direct" else tree_pids(backend.pid)
                    runs, cpu = [], []
                    for _ in range(repeats):
                        before = cpu_seconds(pids)
                        rps, reqs, errs = wrk(c.port, seconds)
                        cpu.append((cpu_seconds(pids) - before) / max(reqs, 1) * 1000)
                        runs.append((rps, errs))
                    results[(n, name)] = {"rps": statistics.median(r for r, _ in runs), "errors": sum(e for _, e in runs),
                                          "cpu_per_1k": statistics.median(cpu), "rss": peak_rss_mib(pids) if name != "direct" else None}
                finally:
                    c.stop()
                print(f"workers={n} {name}: {results[(n, name)]['rps']:.0f} req/s", file=sys.stderr)
            rate = int(results[(n, "nginx")]["rps"] / 2)
            for name in names:
                c = Contender(name, n, tempfile.mkdtemp(dir=tmp))
                c.start()
                try:
                    fixed = [loadgen(c.port, rate, seconds) for _ in range(repeats)]
                finally:
                    c.stop()
                r = results[(n, name)]
                r["rate"] = rate
                for k in ("p50_us", "p99_us", "p999_us"):
                    r[k] = statistics.median(f[k] for f in fixed)
                r["fixed_failed"] = sum(f["non_2xx"] + f["socket_errors"] + f["timeouts"] for f in fixed)
    finally:
        backend.terminate()
        backend.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    write(a, results, worker_counts, names, seconds, repeats)


def write(a, results, worker_counts, names, seconds, repeats):
    cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
    lines = [
        "# luma-proxy benchmarks",
        "",
        "Generated by `benches/compare.py`" + (" in smoke mode (numbers are not meaningful)" if a.smoke else "") + f" on {time.strftime('%Y-%m-%d')}.",
        "",
        f"- Machine: {os.cpu_count()} cores ({cpu.group(1) if cpu else platform.processor()}), {platform.system()} {platform.release()}",
        f"- Versions: luma-proxy {version([f'{REL}/luma-proxy', '--version']).split()[-1]}; {version(['nginx', '-v'])}; "
        f"{version(['haproxy', '-v'])}; caddy {version(['caddy', 'version'])}; {version(['wrk', '-v'])}",
        f"- Backend: luma-demo-backend on 127.0.0.1:{BACKEND}, 1 KiB body, keep-alive. Every contender: access logs off, "
        "X-Forwarded-For/-Proto/-Host and X-Request-Id added, upstream keep-alive pool. Configs with reasons: `benches/peers/`.",
        f"- Saturation: `wrk -t2 -c64 -d{seconds}s`, median of {repeats}. Fixed rate: `luma-loadgen --connections 64 --rate R` "
        f"(open loop, latency from the due time) at R = half of nginx's saturation rate, {seconds} s, median of {repeats}.",
        "- CPU: user+system seconds of all the contender's processes per 1,000 requests in the saturation runs "
        "(the load generator shares the 2 cores, so absolute numbers are lower than on a dedicated client). RSS: peak (VmHWM), summed over processes.",
        "",
    ]
    for n in worker_counts:
        nginx = results[(n, "nginx")]["rps"]
        direct = results[(n, "direct")]["rps"]
        lines += [f"## {n} worker{'s' if n > 1 else ''}", "",
                  "| contender | req/s | vs nginx | vs direct | fixed rate | p50 | p99 | p99.9 | CPU s / 1k req | peak RSS | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in names:
            r = results[(n, name)]
            rss = f"{r['rss']:.1f} MiB" if r["rss"] is not None else "–"
            lines.append(
                f"| {name} | {r['rps']:,.0f} | {r['rps'] / nginx:.2f} | {r['rps'] / direct:.2f} | {r['rate']:,}/s | "
                f"{r['p50_us'] / 1000:.2f} ms | {r['p99_us'] / 1000:.2f} ms | {r['p999_us'] / 1000:.2f} ms | "
                f"{r['cpu_per_1k']:.3f} | {rss} | {r['errors'] + r['fixed_failed']} |")
        lines.append("")
    lines += ["Reproduce: `benches/run.sh` (installs the peers from Debian, builds release binaries, runs this).", ""]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    open(a.out, "w").write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
