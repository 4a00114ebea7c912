#!/usr/bin/env python3
"""Scale: N projects (default 200), one app and one replica each, behind one luma-proxy on the
real engine, deployed one after another with the real `luma` CLI.

Measures:
  * the wall time of every `luma deploy` (reported: project 1, project N, median, max);
  * at 1, 50 and N projects deployed (smoke: 1 and N), after a short settle: the proxy's RSS
    (VmRSS of the container's main process), its idle CPU (utime+stime over an idle window, as
    % of one core), the DNS queries it sent per second over the same window (the counter
    `luma_proxy_dns_queries_total` from `luma-proxy metrics`; "n/a" when the proxy has no such
    metric) and the number of networks the proxy is on;
  * at 1 and at N projects: requests per second through project 1's host (luma-loadgen closed
    loop) and p99 at a fixed rate (half of the 1-project saturation rate, open loop), with the
    same connections, duration and repeats (median of 3) both times, and their ratios.
Every deploy must succeed and its host answer 200 within 60 s (polled, no fixed wait), and at the
end every project's host must answer 200 with its own project's body, or the run fails; with
--smoke a failed request under load fails it too. Progress is printed per deploy.

Everything it creates is named `<prefix>-...` (default prefix `lumascale<pid>`): the projects
`<prefix>-pNNN`, the proxy `<prefix>-proxy` on its own free 127.0.0.1 ports, and its state
volume. All of it is removed at the end, also on failure, Ctrl-C or SIGTERM; nothing else is
touched. Must run as root on the engine's host (it reads /proc/<pid> of the proxy).

Usage: benches/scale.py [--projects 200] [--out docs/scale.md]   (benches/scale.sh builds first)
       benches/scale.py --smoke [--bin-dir target/debug]          (CI: 4 projects, writes nothing)
"""
import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived: stop, then clean up."""


class Failed(Exception):
    """A deploy, request or check failed: the message says which and why."""


def on_signal(signum, _frame):
    raise Interrupted(f"interrupted by signal {signal.Signals(signum).name}")


def log(msg, err=False):
    """Prints a line; a closed stdout or stderr (piped into `head`, a terminal gone) is ignored
    from then on, so it can never cut the clean-up short."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(msg, file=stream, flush=True)
    except OSError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except OSError:
            pass


def run(cmd, timeout, env=None, check=True):
    """Runs `cmd` in its own session (a terminal's Ctrl-C reaches only this harness), returning
    (code, stdout, stderr). On an interrupt the child gets SIGINT and up to 30 s to undo what
    it was doing (luma does), then it is killed."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise Failed(f"`{' '.join(cmd)}` took more than {timeout} s; killed it.\n{out}{err}")
    except BaseException:
        p.send_signal(signal.SIGINT)
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
        raise
    if check and p.returncode != 0:
        raise Failed(f"`{' '.join(cmd)}` failed (exit {p.returncode}):\n{out}{err}")
    return p.returncode, out, err


def docker(*args, timeout=120, check=True):
    return run(["docker", *args], timeout, check=check)[1].strip()


def free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def get(port, host, timeout=5.0):
    """GET / through the proxy with `Host: host`: (status, body), or (None, error text)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", "/", headers={"Host": host, "Connection": "close"})
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    except OSError as e:
        return None, str(e)
    finally:
        c.close()


def answers_as(port, host, project):
    """Whether `host` answers 200 from `project`'s app (the demo echoes its project), and what
    it answered."""
    status, body = get(port, host)
    if status != 200:
        return False, f"status {status}: {body.strip()[:200]}"
    try:
        got = json.loads(body).get("project")
    except ValueError:
        return False, f"200 with a body that is not the demo's JSON: {body[:200]}"
    return got == project, f"200 from project {got!r}"


def wait_answers(port, host, project, bound):
    """Polls until `host` answers 200 from `project`; returns the seconds it took."""
    start = time.monotonic()
    while True:
        ok, what = answers_as(port, host, project)
        if ok:
            return time.monotonic() - start
        if time.monotonic() - start > bound:
            raise Failed(f"{host} did not answer 200 from {project} within {bound} s; last answer: {what}")
        time.sleep(0.1)


class Lab:
    """The objects of one run, by name; `sweep` removes them all."""

    def __init__(self, a):
        self.a = a
        self.prefix = a.prefix or f"lumascale{os.getpid()}"
        self.proxy = f"{self.prefix}-proxy"
        self.http, self.https = free_ports(2)
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self.width = max(3, len(str(a.projects)))
        self.env = dict(os.environ, LUMA_PROXY_NAME=self.proxy,
                        LUMA_PROXY_IMAGE=os.environ.get("LUMA_PROXY_IMAGE", "luma-proxy:dev"),
                        LUMA_HTTP_PORT=f"127.0.0.1:{self.http}", LUMA_HTTPS_PORT=f"127.0.0.1:{self.https}")
        self.proxy_pid = None

    def project(self, i):
        return f"{self.prefix}-p{i:0{self.width}d}"

    def host(self, i):
        return f"p{i:0{self.width}d}.{self.prefix}.test"

    def config(self, i):
        """Writes project i's luma.yml (the demo image, 1 replica, default health interval,
        plain HTTP) and returns its path."""
        d = os.path.join(self.tmp, self.project(i))
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "luma.yml")
        with open(path, "w") as f:
            f.write(f"name: {self.project(i)}\napps:\n  web:\n    image: {self.a.image}\n    replicas: 1\n"
                    f"    health_check: {{path: /up}}\n"
                    f"    proxy: {{hosts: [{self.host(i)}], app_port: 3000, ssl: false}}\n")
        return path

    def luma(self, i, *args, timeout):
        return run([self.a.luma, "-c", self.config(i), *args], timeout, env=self.env)

    def pid(self):
        """The proxy container's main process, checked to be luma-proxy in this PID namespace;
        the same one at every step (a changed pid means the proxy restarted: a failure)."""
        pid = int(docker("inspect", "-f", "{{.State.Pid}}", self.proxy))
        try:
            comm = open(f"/proc/{pid}/comm").read().strip()
        except OSError as e:
            raise Failed(f"cannot read /proc/{pid} of the proxy {self.proxy} ({e}): run the harness as root "
                         "on the Docker engine's host")
        if comm != "luma-proxy":
            raise Failed(f"/proc/{pid}/comm is {comm!r}, not luma-proxy: the engine's PID namespace is not "
                         "this machine's; run the harness on the engine's host")
        if self.proxy_pid is not None and pid != self.proxy_pid:
            raise Failed(f"the proxy {self.proxy} restarted (pid {self.proxy_pid} -> {pid}); see "
                         f"`docker logs {self.proxy}`")
        self.proxy_pid = pid
        return pid

    def networks(self):
        """The names of the networks the proxy is on."""
        return set(json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", self.proxy)))

    def dns_queries(self):
        """Sum of the DNS query counter over its series (`luma_proxy_dns_queries_total`, or
        `luma_dns_queries_total`), or None when the proxy has no such metric."""
        text = docker("exec", self.proxy, "luma-proxy", "metrics")
        vals = [float(m.group(1))
                for m in re.finditer(r"^luma(?:_proxy)?_dns_queries_total(?:\{[^}]*\})? (\S+)", text, re.M)]
        return sum(vals) if vals else None

    def sweep(self):
        """Removes every object named after the prefix: the proxy first (a network cannot go
        while it is attached), then containers (apps, locks, markers), networks, images and
        volumes. Returns what could not be removed."""
        tag = f"{self.prefix}-"
        docker("rm", "-f", "-v", self.proxy, check=False)
        for ids, rm in [
            (lambda: docker("ps", "-aq", "--filter", f"name={tag}", check=False), ["rm", "-f", "-v"]),
            (lambda: docker("network", "ls", "-q", "--filter", f"name={tag}", check=False), ["network", "rm"]),
            (lambda: docker("images", "-q", "--filter", f"reference={tag}*", check=False), ["rmi", "-f"]),
            (lambda: docker("volume", "ls", "-q", "--filter", f"name={tag}", check=False), ["volume", "rm", "-f"]),
        ]:
            found = sorted(set(ids().split()))
            for k in range(0, len(found), 50):
                docker(*rm, *found[k:k + 50], timeout=300, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)
        left = {
            "containers": docker("ps", "-a", "--format", "{{.Names}}", "--filter", f"name={tag}", check=False),
            "networks": docker("network", "ls", "--format", "{{.Name}}", "--filter", f"name={tag}", check=False),
            "images": docker("images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"reference={tag}*",
                             check=False),
            "volumes": docker("volume", "ls", "--format", "{{.Name}}", "--filter", f"name={tag}", check=False),
        }
        return {k: v.split() for k, v in left.items() if v.strip()}


def idle_sample(lab, a):
    """After `settle` seconds, one idle window: CPU % of one core, DNS queries/s, RSS."""
    time.sleep(a.settle)
    pid = lab.pid()
    d0, t_d0 = lab.dns_queries(), time.monotonic()
    c0, t0 = cpu_ticks(pid), time.monotonic()
    time.sleep(a.window)
    c1, t1 = cpu_ticks(pid), time.monotonic()
    d1, t_d1 = lab.dns_queries(), time.monotonic()
    status = open(f"/proc/{pid}/status").read()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024
    dns = None if d0 is None or d1 is None else (d1 - d0) / (t_d1 - t_d0)
    return {"cpu_pct": (c1 - c0) / CLK_TCK / (t1 - t0) * 100, "dns_qps": dns, "rss_mib": rss}


def cpu_ticks(pid):
    # Fields after the parenthesised command name: state is field 3, utime 14 and stime 15.
    rest = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def loadgen(a, port, host, rate, seconds):
    out = run([a.loadgen, "--addr", f"127.0.0.1:{port}", "--host", host, "--connections", str(a.connections),
               "--rate", str(rate), "--duration", str(seconds)], seconds + 60)[1]
    r = json.loads(out)
    r["failed"] = r["non_2xx"] + r["socket_errors"] + r["timeouts"]
    return r


def load_sample(lab, a, rate):
    """Through project 1's host: the median of `repeats` saturation runs (closed loop, req/s),
    then the median p50 and p99 of `repeats` runs at `rate` (open loop; None: half the
    saturation rate just measured)."""
    host = lab.host(1)
    # Other work on this machine skews the figures: the load average before the runs says so.
    busy = os.getloadavg()[0]
    loadgen(a, lab.http, host, 0, 1)  # warm-up: pooled connections open, caches hot
    sat = [loadgen(a, lab.http, host, 0, a.load_seconds) for _ in range(a.repeats)]
    rps = statistics.median(r["rps"] for r in sat)
    rate = rate or max(1, int(rps / 2))
    fixed = [loadgen(a, lab.http, host, rate, a.load_seconds) for _ in range(a.repeats)]
    runs = sat + fixed
    return {"rps": rps, "rate": rate, "p50_us": statistics.median(r["p50_us"] for r in fixed),
            "p99_us": statistics.median(r["p99_us"] for r in fixed), "failed": sum(r["failed"] for r in runs),
            "requests": sum(r["sent"] for r in runs), "loadavg": busy}


def first_line(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return ((r.stdout or r.stderr).strip().splitlines() or ["?"])[0]
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(re.search(r"^MemTotal:\s+(\d+)", open("/proc/meminfo").read(), re.M).group(1)) / 1024 / 1024
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Linux {platform.release()}"


def versions(lab, a):
    commit = first_line(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", ROOT, "status", "--porcelain"])
    return {
        "luma": first_line([a.luma, "--version"]),
        "proxy": first_line(["docker", "exec", lab.proxy, "luma-proxy", "--version"]),
        "proxy_image": first_line(["docker", "image", "inspect", "-f", "{{.Id}}", lab.env["LUMA_PROXY_IMAGE"]])[7:19],
        "commit": commit + (" with uncommitted changes" if dirty not in ("", "?") else ""),
        "docker": first_line(["docker", "version", "--format", "{{.Server.Version}}"]),
    }


def fmt_dns(v):
    return "n/a" if v is None else f"{v:.1f}"


def report(lab, a, deploys, idle, nets, load, vers, total_s):
    n = a.projects
    med = statistics.median(deploys)
    worst = max(range(n), key=lambda k: deploys[k])
    p1, pn = load[1], load[n]
    lines = [
        "# Scale: many projects behind one proxy",
        "",
        f"Generated by `benches/scale.py` on {time.strftime('%Y-%m-%d')}; command: "
        f"`benches/scale.sh{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.",
        "",
        f"- Machine: {machine()}; Docker engine {vers['docker']}.",
        f"- Versions: {vers['luma']}, {vers['proxy']} (image `{lab.env['LUMA_PROXY_IMAGE']}` {vers['proxy_image']}), "
        f"commit {vers['commit']}.",
        f"- Setup: {n} projects, each one app of 1 replica (`{a.image}`, health check `/up` every 1 s, the default), "
        "each with its own host and network, deployed one after another with `luma deploy` to one engine "
        f"with one luma-proxy. Whole run: {total_s / 60:.1f} min.",
        "",
        "## Deploys",
        "",
        "| deploy | wall time |",
        "|---|---:|",
        f"| project 1 | {deploys[0]:.2f} s |",
        f"| project {n} | {deploys[-1]:.2f} s |",
        f"| median of {n} | {med:.2f} s |",
        f"| max (project {worst + 1}) | {deploys[worst]:.2f} s |",
        "",
        "Wall time of `luma deploy` from start to exit: start the replica, health-check it through the proxy, "
        "switch the host, record the release. The first deploy also creates the proxy.",
        "",
        "## The proxy at idle",
        "",
        "| projects deployed | proxy networks (project networks) | RSS | idle CPU | DNS queries/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for k in sorted(idle):
        s = idle[k]
        lines.append(f"| {k} | {nets[k][0]} ({nets[k][1]}) | {s['rss_mib']:.1f} MiB | {s['cpu_pct']:.2f} % | "
                     f"{fmt_dns(s['dns_qps'])} |")
    lines += [
        "",
        f"Measured {a.settle:g} s after the last deploy, over a {a.window:g} s window with no traffic. "
        "Proxy networks: the networks the proxy container is on (`docker inspect`), with this run's project "
        "networks in brackets. RSS: `VmRSS` of the proxy's main process. Idle CPU: its utime+stime over the "
        "window, in % of one core; this is the cost of health checks (one per replica per second) and of "
        "re-resolving routes in the background. DNS queries/s: the increase of `luma_proxy_dns_queries_total` "
        "(`luma-proxy metrics`; DNS look-ups the proxy sent to Docker's DNS) over the window, divided by it; n/a when the proxy has no such metric.",
        "",
        "## Requests through one host",
        "",
        f"| projects deployed | req/s | p99 at {p1['rate']:,} req/s | p50 at {p1['rate']:,} req/s | failed requests "
        "| load average before |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| 1 | {p1['rps']:,.0f} | {p1['p99_us'] / 1000:.2f} ms | {p1['p50_us'] / 1000:.2f} ms | {p1['failed']} "
        f"| {p1['loadavg']:.2f} |",
        f"| {n} | {pn['rps']:,.0f} | {pn['p99_us'] / 1000:.2f} ms | {pn['p50_us'] / 1000:.2f} ms | {pn['failed']} "
        f"| {pn['loadavg']:.2f} |",
        f"| {n} / 1 | {pn['rps'] / p1['rps']:.2f}x | {pn['p99_us'] / max(p1['p99_us'], 1):.2f}x | "
        f"{pn['p50_us'] / max(p1['p50_us'], 1):.2f}x | | |",
        "",
        f"Both through project 1's host `{lab.host(1)}` on the proxy's published port (127.0.0.1), "
        f"{a.connections} keep-alive connections. req/s: `luma-loadgen --rate 0` (closed loop, as fast as "
        f"possible) for {a.load_seconds:g} s, after a 1 s warm-up, median of {a.repeats}. p99 and p50: "
        f"`luma-loadgen --rate {p1['rate']}` (open loop, latency counted from when each request was due) for "
        f"{a.load_seconds:g} s, median of {a.repeats}; the rate is half the 1-project saturation rate and the "
        "same both times. The goal is both ratios "
        "within 10%. The load generator, the proxy and the one demo replica share this machine's cores; the "
        "1-minute load average just before each measurement shows whether anything else was running.",
        "",
        f"At the end all {n} hosts answered 200 from their own project. Reproduce: `benches/scale.sh"
        f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.",
        "",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--projects", type=int, help="projects to deploy (default 200; 4 with --smoke)")
    ap.add_argument("--smoke", action="store_true",
                    help="CI mode: few projects, short windows, every failed request fails the run, writes no docs")
    ap.add_argument("--window", type=float, help="idle window in seconds (default 20; 3 with --smoke)")
    ap.add_argument("--settle", type=float, help="seconds between a deploy and its idle window (default 5; 1 with --smoke)")
    ap.add_argument("--load-seconds", type=float, help="seconds per load run (default 10; 2 with --smoke)")
    ap.add_argument("--repeats", type=int, help="load runs of each kind, median taken (default 3; 1 with --smoke)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--at", help="comma-separated project counts to sample at idle (default 1,50,N; 1,N with --smoke)")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"),
                    help="where luma and luma-loadgen are (default target/release)")
    ap.add_argument("--image", default=os.environ.get("LUMA_DEMO_IMAGE", "luma-demo:dev"))
    ap.add_argument("--prefix", help="name prefix of every object (default lumascale<pid>); must be unique")
    ap.add_argument("--deploy-timeout", type=float, default=300)
    ap.add_argument("--out", help="results file (default docs/scale.md; none with --smoke)")
    a = ap.parse_args()
    smoke = a.smoke
    a.projects = a.projects or (4 if smoke else 200)
    a.window = a.window if a.window is not None else (3 if smoke else 20)
    a.settle = a.settle if a.settle is not None else (1 if smoke else 5)
    a.load_seconds = a.load_seconds or (2 if smoke else 10)
    a.repeats = a.repeats or (1 if smoke else 3)
    if a.out is None and not smoke:
        a.out = os.path.join(ROOT, "docs", "scale.md")
    if a.projects < 1:
        ap.error("--projects must be at least 1")
    if a.prefix and not re.fullmatch(r"[a-z][a-z0-9]{2,20}", a.prefix):
        ap.error("--prefix: 3-21 lowercase letters and digits, starting with a letter")
    at = {1, a.projects} | ({50} if not smoke else set())
    if a.at:
        try:
            at = {int(x) for x in a.at.split(",")} | {1, a.projects}
        except ValueError:
            ap.error("--at: comma-separated numbers, e.g. 1,50,200")
    at = {k for k in at if 1 <= k <= a.projects}
    a.luma = os.path.join(a.bin_dir, "luma")
    a.loadgen = os.path.join(a.bin_dir, "luma-loadgen")
    for b in (a.luma, a.loadgen):
        if not os.access(b, os.X_OK):
            sys.exit(f"scale: {b} is missing: build it (`cargo build --release -p luma-cli -p luma-benches`, "
                     "or benches/scale.sh), or point --bin-dir at it")

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    lab = Lab(a)
    log(f"scale: {a.projects} projects, prefix {lab.prefix}, proxy {lab.proxy} on 127.0.0.1:{lab.http}; "
        f"idle samples at {sorted(at)}")
    started = time.monotonic()
    ok, code = False, 1
    try:
        deploys, idle, nets, load = [], {}, {}, {}
        for i in range(1, a.projects + 1):
            t = time.monotonic()
            lab.luma(i, "deploy", timeout=a.deploy_timeout)
            took = time.monotonic() - t
            deploys.append(took)
            # `luma deploy` returns once the host is switched; the poll proves it from outside.
            ready = wait_answers(lab.http, lab.host(i), lab.project(i), 60)
            on = lab.networks()
            total, mine = len(on), sum(1 for n in on if n.startswith(f"{lab.prefix}-"))
            net = f"{lab.project(i)}-network"
            if net not in on or mine != i:
                raise Failed(f"after {i} deploys the proxy {lab.proxy} is on {mine} of this run's project networks, "
                             f"expected {i} with {net}: {sorted(on)}")
            nets[i] = (total, mine)
            log(f"[{i:{len(str(a.projects))}d}/{a.projects}] {lab.project(i)} deployed in {took:.2f} s, "
                f"answered after {ready:.2f} s more; proxy on {total} networks; "
                f"elapsed {time.monotonic() - started:.0f} s")
            if i in at:
                idle[i] = idle_sample(lab, a)
                s = idle[i]
                log(f"    idle at {i}: RSS {s['rss_mib']:.1f} MiB, CPU {s['cpu_pct']:.2f} % of a core, "
                    f"DNS {fmt_dns(s['dns_qps'])} queries/s over {a.window:g} s")
            if i in (1, a.projects):
                load[i] = load_sample(lab, a, load[1]["rate"] if i > 1 else None)
                r = load[i]
                log(f"    load at {i}: {r['rps']:,.0f} req/s; p99 {r['p99_us'] / 1000:.2f} ms at {r['rate']} req/s; "
                    f"{r['failed']} failed of {r['requests']:,}")
                if smoke and r["failed"]:
                    raise Failed(f"{r['failed']} requests through {lab.host(1)} failed at {i} projects")
        bad = []
        for i in range(1, a.projects + 1):
            good, what = answers_as(lab.http, lab.host(i), lab.project(i))
            if not good:
                bad.append(f"{lab.host(i)}: {what}")
        if bad:
            raise Failed(f"{len(bad)} of {a.projects} hosts did not answer 200 from their project:\n  " + "\n  ".join(bad))
        log(f"all {a.projects} hosts answer 200 from their own project")
        text = report(lab, a, deploys, idle, nets, load, versions(lab, a), time.monotonic() - started)
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                f.write(text)
        log(text)
        if a.out:
            log(f"scale: wrote {a.out}")
        ok = True
    except (Failed, Interrupted) as e:
        log(f"scale: FAILED: {e}", err=True)
        code = 130 if isinstance(e, Interrupted) else 1
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        log(f"scale: removing everything named {lab.prefix}-*")
        left = lab.sweep()
        if left:
            log(f"scale: FAILED to remove: {left}", err=True)
            ok = False
    sys.exit(0 if ok else code)


if __name__ == "__main__":
    main()
