#!/usr/bin/env python3
"""Scale: N projects (default 200), one app and one replica each, behind one luma-proxy on the
real engine, deployed one after another with the real `luma` CLI.

Measures:
  * the wall time of every `luma deploy` (reported: project 1, project N, median, max);
  * at 1, 50 and N projects deployed (smoke: 1 and N), after a short settle: the proxy's RSS
    (VmRSS of the container's main process), its idle CPU (utime+stime over an idle window, as
    % of one core), the DNS queries it sent per second over the same window (the counter
    `luma_proxy_dns_queries_total` from `luma-proxy metrics`) and the number of networks the
    proxy is on;
  * at 1 and at N projects: requests per second through project 1's host (luma-loadgen closed
    loop), the proxy's CPU time per request over those runs, and p99 at a fixed rate (half of
    the 1-project saturation rate, open loop), with the same connections, duration and repeats
    both times (req/s and CPU: median of 3; p99: median of 5, with the lowest and highest, since
    back-to-back p99s of one unchanged sample differ by up to 2x on a shared 2-core VM), and
    their ratios, with the range of p99 ratios those spreads allow; and the rules in the host's FORWARD and
    DOCKER-ISOLATION-STAGE-1 chains at both points. The load comes from a network namespace of
    the run's own (a veth on 198.18.N.0/30) to the port the proxy publishes on the veth's host
    end: a remote client's path, through Docker's DNAT and the host's FORWARD chain;
  * at 1 and at N projects, each fixed-rate run is followed by one at the same rate from this
    host to the proxy's own address on project 1's network (no DNAT, and no FORWARD rules on the
    client's leg) and one to project 1's replica (no proxy; luma-loadgen --local-link): which
    leg a growing tail belongs to (a tail that grows without luma-proxy grows with the host);
  * at 1 and at N projects, after each of those, one more run on the client's path at half the
    fixed rate: the same growth with more of the machine to spare; and over each fixed-rate run
    on the client's path, the proxy's threads' time on a CPU and time waiting for one, per
    request (`/proc/<pid>/task/*/schedstat`);
  * at 1 project (by default not with --smoke), the fixed-rate p99 with 0, 5, 10, 15 and 20 % of
    a core taken by a synthetic background of this harness's own (`--burn-repeats` rounds): the
    tail against the machine's spare CPU, to read the N-project sample against, whose host spends
    more at idle;
  * at 1 project, a control of the host (`host_control_sample`, `--control-repeats` rounds;
    skipped when N is 1): p99 at the fixed rate on four paths, without and then with N-1 idle
    containers of the demo image started with `--network none` (no network, no route, no health
    check, no traffic): luma-proxy in its container on the client's path, nginx in a container
    deployed the same way (an image made from the host's nginx, `nginx_image.py`) on the same
    path, and luma-proxy and nginx run natively on this host in front of project 1's replica,
    from 127.0.0.1. A tail that grows with the idle containers alike for both proxies, in
    containers and natively, grows with the host's per-container machinery, not with luma-proxy;
  * at every idle sample, where the whole machine's idle CPU goes, by process name;
  * luma's host fast path (a DOCKER-USER rule per network pool that accepts the pool's
    established traffic before the per-network rules, and the "edge" rules that do the same for
    a client's established, DNATed connections between the host's uplinks and the proxy's
    bridge): whether the pool's rule was there before the run (`preflight`), and, when this
    run's luma added it, two more load samples at N at the same fixed rate: one with only the
    edge rules for this run's proxy deleted, one with those and the pool's rule deleted; after
    each they are put back where luma inserts them. A rule that was there before the run is not
    this run's and is never touched; `--no-fast-path` runs
    luma with LUMA_HOST_FAST_PATH=off (no comparison); --smoke skips the comparison.
Every deploy must succeed and its host answer 200 within 60 s (polled, no fixed wait), and at the
end every project's host must answer 200 with its own project's body, or the run fails. Every
load run must get only 2xx answers: one non-2xx answer, socket error or timeout reported by
luma-loadgen fails the run (its req/s counts every request, so a proxy answering 502 fast would
otherwise look fast). The proxy must count its DNS queries (`luma_proxy_dns_queries_total`),
and at k projects idle it may send at most k / (0.75 x 30 s) + 1 queries/s (each route
re-resolves in the background every 30 s +-25%; +1 for the odd event-driven look-up), or the
run fails. Progress is printed per deploy.

Everything it creates is named `<prefix>-...` (default prefix `lumascale<pid>`): the projects
`<prefix>-pNNN` (their containers, lock containers `luma-lock_<prefix>-pNNN`, networks
`<prefix>-pNNN-network`), the idle containers of the host control `<prefix>-idleNNN`, the proxy
`<prefix>-proxy` on its own free ports (HTTP on the client namespace's host address, HTTPS on
127.0.0.1), the client namespace `<prefix>-client` and its
veth pair `lsc<n>h`/`lsc<n>c`, and its
state volume `<prefix>-proxy-state`. The run refuses to start when anything with that prefix
exists already. At the end, also on failure, Ctrl-C or SIGTERM, it removes exactly the objects
whose name starts with `<prefix>-` (or `luma-lock_<prefix>-`) or that luma labelled
`luma.project=<prefix>-pNNN`, luma's fast-path rule for its pool when this run's luma
added it (absent before the run, present at the end), and luma's edge rules that name the
run's proxy (`luma edge ... <prefix>-proxy`); nothing else is touched. A signal never
cuts the clean-up short: the first one stops the run (a running `luma` gets SIGINT and 30 s to
undo its step, then it is killed), later ones are ignored. Must run as root on the engine's
host (it reads /proc/<pid> of the proxy and the host's iptables, and makes a network namespace
and a veth pair with iproute2's `ip`). The host control needs nginx (benches/install-peers.sh)
and the luma-proxy binary beside luma in --bin-dir; the native proxies it starts listen on
127.0.0.1 only, in sessions of their own, and are stopped before the next deploy.

Networks: each project takes one subnet of luma's network pool, by default a /24 of
10.210.0.0/16, which holds 256 project networks for the whole engine (other luma projects on it
included). So --projects above 250 needs a larger pool: with neither LUMA_NETWORK_POOL nor
LUMA_NETWORK_SUBNET_SIZE set, the run sets LUMA_NETWORK_SUBNET_SIZE for luma to the largest
subnet that fits (/25 up to 500 projects, /26 up to 1000, ... /28 up to 4000, all in the same
pool); if you set them yourself, they must hold --projects networks.

Usage: benches/scale.py [--projects 200] [--out docs/scale.md]   (benches/scale.sh builds first)
       benches/scale.py --no-fast-path ...                        (luma with LUMA_HOST_FAST_PATH=off)
       benches/scale.py --smoke [--bin-dir target/debug]          (CI: 4 projects, writes nothing)
"""
import argparse
import gzip
import http.client
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib

from compare import fill  # the peers' config templates are filled the same way in both harnesses
import nginx_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived: stop, then clean up."""


class Failed(Exception):
    """A deploy, request or check failed: the message says which and why."""


class Stop:
    """The signals received. The handler only records them and never raises: an exception
    thrown from a handler can land anywhere, also inside the clean-up or between a child's
    start and its being waited for. The run checks the record at safe points instead (after
    every child, in every wait), and once `cleaning` is set nothing acts on it any more."""

    signal = None
    repeated = False
    cleaning = False


STOP = Stop()


def on_signal(signum, _frame):
    name = signal.Signals(signum).name
    if STOP.signal is None:
        STOP.signal = name
    elif not STOP.repeated:
        STOP.repeated = True
        # os.write, not print: a handler that prints while the run is printing would hit the
        # buffered stream re-entrantly (RuntimeError), an exception out of the handler.
        try:
            os.write(2, f"scale: {name} again: still stopping; the clean-up runs to its end\n".encode())
        except OSError:
            pass


def check_stop():
    """Raises Interrupted once a signal has arrived, until the clean-up has begun."""
    if STOP.signal is not None and not STOP.cleaning:
        raise Interrupted(f"interrupted by {STOP.signal}")


def pause(seconds):
    """Sleeps, but returns early (raising Interrupted) within 0.2 s of a signal."""
    end = time.monotonic() + seconds
    while True:
        check_stop()
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.2, left))


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


def kill_group(p):
    """SIGKILL to the child's process group (its own session, see `run`)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# How long a child gets after SIGINT to undo its step (luma removes what its release created).
GRACE = 30


def run(cmd, timeout, env=None, check=True):
    """Runs `cmd` in its own session (a terminal's Ctrl-C reaches only this harness), returning
    (code, stdout, stderr). On a signal (outside the clean-up) the child gets SIGINT and GRACE
    seconds to undo what it was doing, then it is killed, and Interrupted is raised. A child
    that outlives `timeout` is killed and Failed raised (also with check=False: the caller of a
    clean-up step catches it). Whatever happens, no child outlives this call."""
    check_stop()  # a signal before the start: do not start it at all
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    except OSError as e:  # a missing program (`ip`, `iptables`, `docker`): said, not a traceback
        raise Failed(f"cannot run `{' '.join(cmd)}`: {e}")
    try:
        deadline = time.monotonic() + timeout
        asked = None  # when the child got SIGINT
        while True:
            try:
                # Short slices so a signal is acted on within 0.2 s.
                out, err = p.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                if asked is None and STOP.signal is not None and not STOP.cleaning:
                    p.send_signal(signal.SIGINT)
                    asked = now
                elif asked is not None and now - asked > GRACE:
                    log(f"scale: `{os.path.basename(cmd[0])}` still running {GRACE} s after SIGINT; killing it",
                        err=True)
                    kill_group(p)
                    asked = float("inf")  # killed: just collect what it wrote
                elif now > deadline:
                    kill_group(p)
                    out, err = p.communicate()
                    raise Failed(f"`{' '.join(cmd)}` took more than {timeout:g} s; killed it.\n{out}{err}")
    finally:
        if p.poll() is None:
            kill_group(p)
            p.wait()
    check_stop()  # a child stopped by the signal failed because of it: report the signal
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


def get(addr, host, timeout=5.0):
    """GET / through the proxy at `addr` (ip, port) with `Host: host`: (status, body), or
    (None, error text)."""
    c = http.client.HTTPConnection(*addr, timeout=timeout)
    try:
        c.request("GET", "/", headers={"Host": host, "Connection": "close"})
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    except OSError as e:
        return None, str(e)
    finally:
        c.close()


def answers_as(addr, host, project):
    """Whether `host` answers 200 from `project`'s app (the demo echoes its project), and what
    it answered."""
    status, body = get(addr, host)
    if status != 200:
        return False, f"status {status}: {body.strip()[:200]}"
    try:
        got = json.loads(body).get("project")
    except ValueError:
        return False, f"200 with a body that is not the demo's JSON: {body[:200]}"
    return got == project, f"200 from project {got!r}"


def wait_answers(addr, host, project, bound):
    """Polls until `host` answers 200 from `project`; returns the seconds it took."""
    start = time.monotonic()
    while True:
        ok, what = answers_as(addr, host, project)
        if ok:
            return time.monotonic() - start
        if time.monotonic() - start > bound:
            raise Failed(f"{host} did not answer 200 from {project} within {bound} s; last answer: {what}")
        pause(0.1)


# luma's default network pool (luma-cli/src/netpool.rs DEFAULT_POOL); LUMA_NETWORK_POOL replaces it.
DEFAULT_POOL = "10.210.0.0/16"
# The chain Docker leaves to its users; FORWARD jumps to it before Docker's own rules.
USER_CHAIN = "DOCKER-USER"
# luma's switch for the fast path and the values that turn it off (luma-cli/src/hostpath.rs).
FAST_PATH_ENV, FAST_PATH_OFF = "LUMA_HOST_FAST_PATH", ("off", "0", "false")
# The host chains that grow with every Docker network, counted at 1 and at N projects.
HOST_CHAINS = ("FORWARD", "DOCKER-ISOLATION-STAGE-1")


def fast_path_spec(pool):
    """luma's host fast-path rule for `pool` after `DOCKER-USER`, exactly as luma writes it: the
    same words are what `iptables -C` and `-D` match. It accepts the pool's established traffic
    before the host's per-network FORWARD rules see it."""
    return ["-s", pool, "-d", pool, "-m", "physdev", "--physdev-is-bridged", "-m", "conntrack", "--ctstate",
            "RELATED,ESTABLISHED", "-m", "comment", "--comment", f"luma fast path {pool}", "-j", "ACCEPT"]


# The comment luma's edge rules start with (luma-cli/src/hostpath/edge.rs): the client's leg,
# between the host's uplinks and the bridge of the proxy's published ports.
EDGE_MARK = "luma edge "


def edge_rules():
    """luma's edge rules in DOCKER-USER, each as the words after `-A DOCKER-USER` (what `-D` and
    `-I` take). `iptables -S` quotes the comment; the quotes are dropped, as a shell would."""
    return [shlex.split(line)[2:] for line in chain_rules(USER_CHAIN)
            if f'--comment "{EDGE_MARK}' in line]


def insert_before_return(spec):
    """Puts a DOCKER-USER rule where luma inserts its own: just before the first bare `-j RETURN`
    (nothing after it is reached), or at the end of the chain when it has none."""
    rules = [r.split() for r in chain_rules(USER_CHAIN)]
    bare = ["-A", USER_CHAIN, "-j", "RETURN"]
    if bare in rules:
        iptables("-I", USER_CHAIN, str(rules.index(bare) + 1), *spec)
    else:
        iptables("-A", USER_CHAIN, *spec)


def iptables(*args, check=True):
    """`iptables -w 5 ARGS` (waits up to 5 s for the xtables lock): (code, stdout, stderr).
    A missing iptables is Failed too, so callers that can do without it catch one thing."""
    try:
        return run(["iptables", "-w", "5", *args], 30, check=check)
    except OSError as e:
        raise Failed(f"cannot run iptables ({e}): install it, or run the harness on the Docker engine's host")


def chain_rules(chain):
    """The rules of `chain` as `iptables -S` prints them (`-A CHAIN ...`, in order). Failed when
    the chain is missing: `iptables -C` answers 1 for a missing chain as for a missing rule, so a
    check needs this first."""
    code, out, err = iptables("-S", chain, check=False)
    if code != 0:
        raise Failed(f"`iptables -S {chain}` failed (exit {code}): {(err or out).strip()[:200]}; the chain "
                     "exists only while Docker manages the host's iptables")
    return [line for line in out.splitlines() if line.startswith("-A ")]


def host_rules():
    """{chain: number of rules, or why it is unknown} for HOST_CHAINS. Never fails the run: the
    counts explain the figures, they are not checked."""
    counts = {}
    for chain in HOST_CHAINS:
        try:
            counts[chain] = len(chain_rules(chain))
        except Failed as e:
            counts[chain] = str(e)
    return counts


def bridge_nf():
    """net.bridge.bridge-nf-call-iptables on this host: "1" when packets crossing a bridge (those
    between the proxy and a replica) go through the iptables chains."""
    try:
        return open("/proc/sys/net/bridge/bridge-nf-call-iptables").read().strip()
    except OSError:
        return "absent (br_netfilter not loaded)"


def kernel_option(name):
    """`y`/`m`, `not set`, or `unknown`: a build option of the running kernel."""
    try:
        text = open(f"/boot/config-{platform.release()}").read()
    except OSError:
        try:
            with gzip.open("/proc/config.gz", "rt") as f:
                text = f.read()
        except OSError:
            return "unknown"
    m = re.search(rf"^{name}=(\S+)", text, re.M)
    return m.group(1) if m else "not set"


# The label luma puts on every container, network, volume and image of a project
# (luma-cli/src/names.rs LABEL_PROJECT); the proxy and its volume have only `luma.role`.
LABEL_PROJECT = "luma.project"
LABEL_ROLE = "luma.role"


class ClientNet:
    """A network namespace standing in for a client on another machine: a veth pair on
    198.18.N.0/30 (RFC 2544's benchmarking range), the host's end `.1`, the client's `.2`. The
    proxy's HTTP port is published on the host's end, so the client's load takes a remote
    client's path: in through a link, Docker's DNAT in PREROUTING, the host's FORWARD chain to
    the proxy's bridge and back, all its rules included. The load generator runs in the
    namespace (`ip netns exec`). Names: the namespace `<prefix>-client`, the host's veth
    `lsc<n>h` (15 bytes at most, so a number from the prefix)."""

    def __init__(self, prefix):
        self.linked = False  # the veth pair is this run's (only then may the clean-up delete it)
        n = zlib.crc32(prefix.encode())
        self.ns = f"{prefix}-client"
        self.host_if, self.client_if = f"lsc{n % 1000000}h", f"lsc{n % 1000000}c"
        self.subnet = None  # 198.18.N, chosen free by `create`
        self.made = False

    @property
    def host_ip(self):
        return f"{self.subnet}.1"

    def exec_prefix(self):
        return ["ip", "netns", "exec", self.ns]

    def check_free(self):
        """Failed when the namespace or the veth exists already (another run, or a leftover)."""
        if self.ns in run(["ip", "netns", "list"], 30)[1].split():
            raise Failed(f"the network namespace {self.ns} exists already; another run uses this prefix, or an "
                         f"earlier one left it (`ip netns del {self.ns}` once you know it is not someone else's)")
        if os.path.exists(f"/sys/class/net/{self.host_if}"):
            raise Failed(f"the interface {self.host_if} exists already; pick another --prefix")

    def pick_subnet(self):
        """The first 198.18.N.0/30 (N from the prefix's number on) that no address or route of
        this host touches."""
        used = run(["ip", "-4", "-o", "addr"], 30)[1] + run(["ip", "-4", "route", "show", "table", "all"], 30)[1]
        start = zlib.crc32(self.ns.encode()) % 256
        for k in range(256):
            net = f"198.18.{(start + k) % 256}"
            if f" {net}." not in used and f"\n{net}." not in used and not used.startswith(f"{net}."):
                self.subnet = net
                return
        raise Failed("every 198.18.N.0/24 has an address or route on this host; cannot make the client namespace")

    def create(self):
        self.made = True  # from the first command on, the clean-up tries to remove it
        run(["ip", "netns", "add", self.ns], 30)
        run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.client_if,
             "netns", self.ns], 30)
        self.linked = True
        run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if], 30)
        run(["ip", "link", "set", self.host_if, "up"], 30)
        run(["ip", "-n", self.ns, "addr", "add", f"{self.subnet}.2/30", "dev", self.client_if], 30)
        run(["ip", "-n", self.ns, "link", "set", self.client_if, "up"], 30)
        run(["ip", "-n", self.ns, "link", "set", "lo", "up"], 30)

    def remove(self):
        """Deleting the namespace deletes its end of the veth, and with it the host's end."""
        if not self.made:
            return
        if self.ns in run(["ip", "netns", "list"], 30)[1].split():
            run(["ip", "netns", "del", self.ns], 30)
        # The kernel takes the pair down after the namespace goes, not at once.
        deadline = time.monotonic() + 10
        while os.path.exists(f"/sys/class/net/{self.host_if}") and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.linked and os.path.exists(f"/sys/class/net/{self.host_if}"):
            run(["ip", "link", "del", self.host_if], 30)

    def left(self):
        found = []
        if self.made and self.ns in run(["ip", "netns", "list"], 30, check=False)[1].split():
            found.append(f"netns {self.ns}")
        if self.linked and os.path.exists(f"/sys/class/net/{self.host_if}"):
            found.append(f"link {self.host_if}")
        return found


class Lab:
    """The objects of one run, by name; `sweep` removes them all."""

    def __init__(self, a):
        self.a = a
        self.prefix = a.prefix or f"lumascale{os.getpid()}"
        self.proxy = f"{self.prefix}-proxy"
        self.http, self.https = free_ports(2)
        self.client = ClientNet(self.prefix)
        self.tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self.width = max(3, len(str(a.projects)))
        self.env = dict(os.environ, LUMA_PROXY_NAME=self.proxy,
                        LUMA_PROXY_IMAGE=os.environ.get("LUMA_PROXY_IMAGE", "luma-proxy:dev"),
                        LUMA_HTTPS_PORT=f"127.0.0.1:{self.https}", **a.net_env)
        if a.no_fast_path:
            self.env[FAST_PATH_ENV] = "off"
        # luma's host fast path for this run's pool: `on` unless luma runs with it off; `before`
        # True/False from `preflight` (None: could not tell, `reason` says why); `state` at N
        # projects (`fast_path_ab`): made (by this run's luma), pre-existing, absent, unavailable.
        self.fast_path = {"pool": self.env.get("LUMA_NETWORK_POOL", "").strip() or DEFAULT_POOL,
                          "on": self.env.get(FAST_PATH_ENV, "").strip() not in FAST_PATH_OFF,
                          "before": None, "reason": None, "state": None,
                          # Whether DOCKER-USER could be listed before the run, and at N projects
                          # the edge rules this run's luma added for its proxy (`fast_path_ab`).
                          "edges_listed": False, "edges": []}
        self.proxy_pid = None

    @property
    def public(self):
        """The proxy's published HTTP port: (the client namespace's host address, port). From
        this host it is reached through Docker's DNAT in OUTPUT."""
        return self.client.host_ip, self.http

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
                    f"    health_check: {{path: /up{', interval: ' + self.a.check_interval if self.a.check_interval else ''}}}\n"
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

    def replica_addr(self, i):
        """(`ip:3000`, container name) of project i's one replica on its project network, for
        the load that bypasses the proxy: the app container labelled with the project (role app)."""
        project, net = self.project(i), f"{self.project(i)}-network"
        names = docker("ps", "--filter", f"label={LABEL_PROJECT}={project}", "--filter", f"label={LABEL_ROLE}=app",
                       "--format", "{{.Names}}").split()
        if len(names) != 1:
            raise Failed(f"project {project} has {len(names)} running app containers ({names}), expected its one "
                         "replica; see `docker ps -a`")
        return f"{address_on(names[0], net)}:3000", names[0]

    def proxy_addr(self, i):
        """`ip:8080` of the proxy's HTTP listener on project i's network: reached from this host
        without DNAT and without the host's FORWARD chain."""
        return f"{address_on(self.proxy, f'{self.project(i)}-network')}:8080"

    def networks(self):
        """The names of the networks the proxy is on."""
        return set(endpoints(self.proxy))

    def dns_queries(self):
        """The proxy's DNS query counter (`luma_proxy_dns_queries_total`, summed over its
        series). A proxy without it fails the run: the idle DNS rate is one of the figures."""
        text = docker("exec", self.proxy, "luma-proxy", "metrics")
        vals = [float(m.group(1))
                for m in re.finditer(r"^luma_proxy_dns_queries_total(?:\{[^}]*\})? (\S+)$", text, re.M)]
        if not vals:
            raise Failed(f"`docker exec {self.proxy} luma-proxy metrics` has no luma_proxy_dns_queries_total, "
                         f"so the idle DNS rate cannot be measured: the image {self.env['LUMA_PROXY_IMAGE']} "
                         "predates the DNS counter; rebuild it (docker/build-images.sh dev) or set "
                         "LUMA_PROXY_IMAGE to a current one")
        return sum(vals)

    def fast_path_present(self):
        """Whether luma's fast-path rule for this run's pool is in DOCKER-USER (`iptables -C`:
        exit 0 yes, 1 no); Failed when that cannot be told."""
        chain_rules(USER_CHAIN)  # a missing chain: Failed here, not a misleading "no"
        code, out, err = iptables("-C", USER_CHAIN, *fast_path_spec(self.fast_path["pool"]), check=False)
        if code not in (0, 1):
            raise Failed(f"`iptables -C {USER_CHAIN}` for luma's fast-path rule failed (exit {code}): "
                         f"{(err or out).strip()[:200]}")
        return code == 0

    def remove_fast_path(self):
        """Deletes luma's fast-path rule for this run's pool, every copy (one left would keep
        the fast path on); nothing when it is absent. Only for a rule this run's luma added."""
        spec = fast_path_spec(self.fast_path["pool"])
        for _ in range(10):
            if not self.fast_path_present():
                return
            iptables("-D", USER_CHAIN, *spec)
        raise Failed(f"luma's fast-path rule for {self.fast_path['pool']} is still in {USER_CHAIN} after 10 "
                     f"deletions; see `iptables -S {USER_CHAIN}`")

    def restore_fast_path(self):
        """Puts luma's fast-path rule back as luma inserts it: just before the first bare
        `-j RETURN` of DOCKER-USER, or at its end when it has none."""
        if self.fast_path_present():
            raise Failed(f"luma's fast-path rule for {self.fast_path['pool']} came back in {USER_CHAIN} during "
                         "the load sample without it (another luma deployed?): that sample is not one without it")
        insert_before_return(fast_path_spec(self.fast_path["pool"]))
        if not self.fast_path_present():
            raise Failed(f"luma's fast-path rule for {self.fast_path['pool']} is not in {USER_CHAIN} after "
                         f"putting it back; see `iptables -S {USER_CHAIN}`")

    def edge_rules_made(self):
        """luma's edge rules for this run's proxy (each names its proxy in its comment), which
        only this run's luma makes."""
        return [r for r in edge_rules() if "--comment" in r
                and r[r.index("--comment") + 1].endswith(f" {self.proxy}")]

    def remove_edge_rules(self, rules):
        """Deletes these edge rules (each as `edge_rules` gives it), every copy."""
        for spec in rules:
            while spec in edge_rules():
                iptables("-D", USER_CHAIN, *spec)

    def mine(self, name, project_label):
        """Whether a Docker object belongs to this run: luma labelled it with one of this run's
        projects, or its name starts with `<prefix>-` (or is a lock container `luma-lock_<prefix>-`).
        An exact start, never a substring: with prefix `web`, `shop-web-1` is not ours. The
        prefix was checked unused before the run (`preflight`), so these are all this run's."""
        if project_label and project_label in self.projects:
            return True
        return name.startswith((f"{self.prefix}-", f"luma-lock_{self.prefix}-"))

    @property
    def projects(self):
        return {self.project(i) for i in range(1, self.a.projects + 1)}

    def owned(self):
        """This run's objects by kind, {kind: [names]}; a listing that fails raises Failed."""
        label = f'{{{{.Label "{LABEL_PROJECT}"}}}}'

        def rows(*args):
            return [line.split("|", 1) for line in docker(*args, timeout=120).splitlines() if line.strip()]

        found = {
            "containers": [n for n, l in rows("ps", "-a", "--format", "{{.Names}}|" + label) if self.mine(n, l)],
            "networks": [n for n, l in rows("network", "ls", "--format", "{{.Name}}|" + label) if self.mine(n, l)],
            # `docker images --format` has no labels; images luma builds are named
            # `<project>_<app>` (names.rs image_repo), so the name decides.
            "images": [n for n, _ in rows("images", "--format", "{{.Repository}}:{{.Tag}}|") if self.mine(n, "")],
            "volumes": [n for n, l in rows("volume", "ls", "--format", "{{.Name}}|" + label) if self.mine(n, l)],
        }
        return {k: sorted(set(v)) for k, v in found.items() if v}

    def sweep(self):
        """Removes this run's objects (`owned`): the proxy first (a network cannot go while it
        is attached), then containers (apps, locks, markers), networks, images and volumes, then
        luma's fast-path rule if this run's luma added it (absent before the run, present now; a
        rule that was there before is someone else's). Every step catches its own errors, so one
        slow or failing `docker rm` does not leave the rest in place. Returns (what is left, the
        errors met)."""
        errors = []

        def step(what, fn):
            try:
                return fn()
            except Exception as e:  # Failed, OSError (docker missing), anything: note it, go on
                errors.append(f"{what}: {e}")
                return None

        step(f"removing the proxy {self.proxy}",
             lambda: docker("rm", "-f", "-v", self.proxy, timeout=120, check=False))
        found = step("listing this run's objects", self.owned) or {}
        for kind, rm in [("containers", ["rm", "-f", "-v"]), ("networks", ["network", "rm"]),
                         ("images", ["rmi", "-f"]), ("volumes", ["volume", "rm", "-f"])]:
            names = found.get(kind, [])
            for k in range(0, len(names), 50):
                batch = names[k:k + 50]
                step(f"removing {kind} {batch[0]}..{batch[-1]}", lambda: docker(*rm, *batch, timeout=300))
        # Only a rule this run's luma added with the fast path on (absent before the run); the
        # rule belongs to the pool, so other luma projects on this host lose it until their next
        # deploy: the host is left as the run found it.
        if self.fast_path["before"] is False and self.fast_path["on"]:
            step(f"removing luma's fast-path rule for {self.fast_path['pool']} from {USER_CHAIN}",
                 self.remove_fast_path)
        # The edge rules this run's luma added for its proxy, which is gone now.
        if self.fast_path["edges_listed"] and self.fast_path["on"]:
            step(f"removing the edge rules this run's luma added to {USER_CHAIN}",
                 lambda: self.remove_edge_rules(self.edge_rules_made()))
        step(f"removing the client namespace {self.client.ns}", self.client.remove)
        step(f"removing {self.tmp}", lambda: shutil.rmtree(self.tmp))
        left = step("listing what is left", self.owned)
        if left is None:
            left = {"unknown": ["the listing failed, see the errors"]}
        client_left = step("listing the client namespace", self.client.left)
        if client_left is None or client_left:
            left["client namespace"] = client_left or ["the listing failed, see the errors"]
        return left, errors


def endpoints(container):
    """A container's networks, {name: endpoint settings} (`docker inspect`)."""
    return json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container))


def address_on(container, net):
    """A container's IPv4 address on network `net`."""
    nets = endpoints(container)
    ip = (nets.get(net) or {}).get("IPAddress")
    if not ip:
        raise Failed(f"{container} has no address on {net}: it is on {sorted(nets)}")
    return ip


def preflight(lab):
    """Refuses a prefix that anything on the engine already uses: the clean-up removes every
    object named `<prefix>-...`, which must therefore all be this run's. Then records whether
    luma's fast-path rule for the pool is there before the run: only a rule that was not can be
    this run's, to compare without and to remove at the end. No iptables or no DOCKER-USER: the
    run goes on with the fast path "unavailable" (reason recorded)."""
    found = lab.owned()
    if found:
        shown = "; ".join(f"{k}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}" for k, v in found.items())
        raise Failed(f"objects with the prefix {lab.prefix!r} exist already ({shown}); another run uses it, or an "
                     "earlier one left them. Pick another --prefix, or remove them once you know they are not "
                     "someone else's")
    lab.client.check_free()
    lab.client.pick_subnet()
    lab.env["LUMA_HTTP_PORT"] = f"{lab.client.host_ip}:{lab.http}"
    try:
        lab.fast_path["before"] = lab.fast_path_present()
        edge_rules()  # a listing that fails is Failed here, like the pool rule's check
        lab.fast_path["edges_listed"] = True
    except Failed as e:
        lab.fast_path["reason"] = str(e)


def fast_path_before(lab):
    """The start line's words on the fast-path rule."""
    fp = lab.fast_path
    what = {True: "present before the run (not this run's; left alone)", False: "absent before the run",
            None: f"unavailable ({fp['reason']})"}[fp["before"]]
    return f"fast-path rule for {fp['pool']} {what}" + ("" if fp["on"] else f"; {fast_path_setting(lab)}")


def fast_path_setting(lab):
    """How luma's environment set the fast path, e.g. `LUMA_HOST_FAST_PATH=off`."""
    return f"{FAST_PATH_ENV}={lab.env.get(FAST_PATH_ENV, '')}"


# The proxy's default background re-resolve pace (luma-proxy --refresh-every, 30 s) and its
# jitter (+-25%): at idle each route re-resolves at most once per 0.75 x 30 s.
REFRESH_EVERY_S = 30
REFRESH_JITTER = 0.25


def dns_bound(k):
    """The most DNS queries/s k idle routes may cost: each at its fastest background pace,
    plus 1/s for event-driven look-ups (a health check's failure kick, the proxy's own name)."""
    return k / ((1 - REFRESH_JITTER) * REFRESH_EVERY_S) + 1


def idle_sample(lab, a, k):
    """After `settle` seconds, one idle window at k projects: CPU % of one core, DNS
    queries/s, RSS. More DNS queries/s than `dns_bound(k)` fails the run: the proxy has gone
    back to re-resolving in a storm (or a route is stuck degraded, retrying every few s)."""
    pause(a.settle)
    pid = lab.pid()
    d0, t_d0 = lab.dns_queries(), time.monotonic()
    # A scan of /proc takes time that grows with the projects: it stays out of the window of
    # the proxy's and the machine's figures, and the per-process figures are divided by the
    # time from the start of one scan to the end of the other.
    tp0, p0 = time.monotonic(), process_ticks()
    c0, t0, h0 = cpu_ticks(pid), time.monotonic(), host_busy_ticks()
    pause(a.window)
    c1, t1, h1 = cpu_ticks(pid), time.monotonic(), host_busy_ticks()
    p1, tp1 = process_ticks(), time.monotonic()
    d1, t_d1 = lab.dns_queries(), time.monotonic()
    status = open(f"/proc/{pid}/status").read()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024
    dns = (d1 - d0) / (t_d1 - t_d0)
    if dns > dns_bound(k):
        raise Failed(f"at {k} idle projects the proxy {lab.proxy} sent {dns:.2f} DNS queries/s ({d1 - d0:g} over "
                     f"{t_d1 - t_d0:.1f} s), more than the {dns_bound(k):.2f} its {REFRESH_EVERY_S} s "
                     f"+-{REFRESH_JITTER:.0%} background pace allows; see `docker logs {lab.proxy}`")
    by_name = {}
    for key, ticks in p1.items():
        if key in p0:
            by_name[key[1]] = by_name.get(key[1], 0) + ticks - p0[key]
    return {"cpu_pct": (c1 - c0) / CLK_TCK / (t1 - t0) * 100, "dns_qps": dns, "rss_mib": rss,
            "host_pct": (h1 - h0) / CLK_TCK / (t1 - t0) * 100,
            "by_name": {n: t / CLK_TCK / (tp1 - tp0) * 100 for n, t in by_name.items() if t > 0}}


def process_ticks():
    """utime+stime of every process on this machine (threads included), {(pid, name): ticks},
    from `/proc/<pid>/stat`; a process gone between the listing and the read is skipped. The
    difference of two readings, summed by name, says where the whole machine's idle CPU goes
    (processes started or ended within the window are not counted)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            continue
        # Kernel threads per CPU or queue (`kworker/1:2-events`, `ksoftirqd/0`) count as one name.
        name = text[text.index("(") + 1:text.rindex(")")].split("/", 1)[0]
        rest = text.rsplit(")", 1)[1].split()
        out[(int(d), name)] = int(rest[11]) + int(rest[12])
    return out


def host_busy_ticks():
    """The whole machine's busy time (every CPU, `/proc/stat`: all but idle and iowait), in
    clock ticks: what the replicas, their containerd shims and the engine cost at idle beside
    the proxy."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def sched_ns(pid):
    """{thread id: (run, wait)} of the proxy's threads in ns (`/proc/<pid>/task/*/schedstat`:
    time on a CPU, and time runnable but waiting for one); a thread gone between the listing and
    the read is skipped. Failed when none can be read (a kernel without CONFIG_SCHED_INFO)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError as e:
        raise Failed(f"cannot list /proc/{pid}/task ({e}): the proxy's process is gone; see `docker logs` of the proxy")
    for tid in tids:
        try:
            fields = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()
            out[tid] = (int(fields[0]), int(fields[1]))
        except (OSError, ValueError, IndexError):
            continue
    if not out:
        raise Failed(f"no thread of the proxy (pid {pid}) has a readable /proc/.../schedstat: this kernel keeps no "
                     "scheduler statistics (CONFIG_SCHED_INFO)")
    return out


def sched_delta(before, after):
    """(run, wait) in ns between two `sched_ns` readings, over the threads alive at the second
    (a thread started in between counts from 0; one that ended in between is lost with its
    share, which the proxy's short-lived blocking threads keep small)."""
    run = sum(r - before.get(t, (0, 0))[0] for t, (r, _) in after.items())
    wait = sum(w - before.get(t, (0, 0))[1] for t, (_, w) in after.items())
    return run, wait


def cpu_ticks(pid):
    # Fields after the parenthesised command name: state is field 3, utime 14 and stime 15.
    try:
        rest = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError as e:
        raise Failed(f"cannot read /proc/{pid}/stat ({e}): the proxy's process is gone (it exited or "
                     "restarted); see `docker logs` of the proxy")
    return int(rest[11]) + int(rest[12])


def loadgen(lab, a, rate, seconds, port=None, addr=None, container=None, peer=None, published=None):
    """One luma-loadgen run with project 1's host: by default from the client namespace to the
    proxy's published port (a remote client's path), or to `published` (the port `container`
    publishes on the same address); with `port`, to 127.0.0.1:port; with `addr` (ip:port of
    `container`), from this host straight to a container's address. Failed
    unless every request it sent got a 2xx answer. Its req/s counts every request, failed ones
    too, so a run with failures measures the wrong thing."""
    host = lab.host(1)
    if port:
        prefix, target, flags, logs = [], f"127.0.0.1:{port}", [], peer or "the reference backend"
    elif addr:
        prefix, target, flags, logs = [], addr, ["--local-link"], f"`docker logs {container}`"
    else:
        prefix, target = lab.client.exec_prefix(), f"{lab.client.host_ip}:{published or lab.http}"
        flags, logs = ["--local-link"], f"`docker logs {container or lab.proxy}`"
    cmd = [*prefix, a.loadgen, "--addr", target, "--host", host, "--connections", str(a.connections),
           "--rate", str(rate), "--duration", str(seconds), *flags]
    out = run(cmd, seconds + 60)[1]
    try:
        r = json.loads(out)
        sent, ok = int(r["sent"]), int(r["ok"])
        bad = {k: int(r[k]) for k in ("non_2xx", "socket_errors", "timeouts")}
    except (ValueError, KeyError, TypeError) as e:
        raise Failed(f"`{' '.join(cmd)}` printed no summary with sent, ok, non_2xx, socket_errors and timeouts "
                     f"({e!r}): {out[:300]!r}")
    if sent == 0 or ok != sent or any(bad.values()):
        raise Failed(f"to {target} with Host {host} at {'saturation' if rate == 0 else f'{rate} req/s'}: {ok} of "
                     f"{sent} requests got a 2xx answer ({', '.join(f'{k} {v}' for k, v in bad.items())}); "
                     f"see {logs}")
    return r


def wait_listening(port, procs, why):
    """Returns once something accepts on 127.0.0.1:`port`; Failed with `why()` after 10 s, or as
    soon as one of `procs` has ended."""
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise Failed(why())
            pause(0.05)


def reference_rps(lab, a):
    """This machine's speed just now: req/s of the same closed-loop load against a native
    luma-demo-backend on 127.0.0.1 (no proxy, no container), median of `repeats` runs of half
    the load length. The 1- and N-project samples are minutes apart, and this machine's speed
    drifts by tens of percent in that time (a VM's neighbours), so each sample carries its own
    reference and the report also gives req/s over it."""
    port = free_ports(1)[0]
    env = dict(os.environ, PORT=str(port), BIND="127.0.0.1")
    proc = subprocess.Popen([a.demo_backend], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_listening(port, [proc], lambda: f"the reference backend {a.demo_backend} did not listen on 127.0.0.1:{port}")
        seconds = max(1.0, a.load_seconds / 2)
        return statistics.median(loadgen(lab, a, 0, seconds, port)["rps"] for _ in range(a.repeats))
    finally:
        kill_group(proc)
        proc.wait()


def load_sample(lab, a, rate, others=True):
    """From the client namespace to the proxy's published port with project 1's host (the path
    of a client on another machine): the median of `repeats` saturation runs (closed loop,
    req/s, and the proxy's CPU microseconds per request sent: its utime+stime read around each
    run), then the median p50 and p99 of `p99_repeats` runs at `rate` (open loop; None: half the
    saturation rate just measured). With `others`, each fixed-rate run is followed by one at the
    same rate from this host to the proxy's own address on project 1's network (no DNAT, and
    none of the host's FORWARD rules on the client's leg) and one straight to project 1's
    replica (no proxy, no FORWARD rules): a tail that grows on every path grows with the host;
    one that grows only on the client's path is the client leg's (DNAT and FORWARD); one that
    grows at the proxy's address but not at the replica's is the proxy's or its leg to the
    replica (the sample without the fast path tells those apart)."""
    # Other work on this machine skews the figures: the load average before the runs says so.
    busy = os.getloadavg()[0]
    pid = lab.pid()
    ref = reference_rps(lab, a)
    loadgen(lab, a, 0, 1)  # warm-up: pooled connections open, caches hot
    sat, cpu_us = [], []
    for _ in range(a.repeats):
        c0 = cpu_ticks(pid)
        r = loadgen(lab, a, 0, a.load_seconds)
        cpu_us.append((cpu_ticks(pid) - c0) / CLK_TCK / r["sent"] * 1e6)
        sat.append(r)
    lab.pid()  # the same proxy process throughout, or the CPU figures are of two
    rps = statistics.median(r["rps"] for r in sat)
    rate = rate or max(1, int(rps / 2))
    own, replica = (lab.proxy_addr(1), lab.replica_addr(1)) if others else (None, None)
    fixed, at_proxy, straight, light = [], [], [], []
    waits = []
    for _ in range(a.p99_repeats):
        s0 = sched_ns(pid)
        fixed.append(loadgen(lab, a, rate, a.load_seconds))
        ran, waited = sched_delta(s0, sched_ns(pid))
        waits.append((ran / fixed[-1]["sent"] / 1e3, waited / fixed[-1]["sent"] / 1e3))
        if others:
            at_proxy.append(loadgen(lab, a, rate, a.load_seconds, addr=own, container=lab.proxy))
            straight.append(loadgen(lab, a, rate, a.load_seconds, addr=replica[0], container=replica[1]))
            light.append(loadgen(lab, a, max(1, rate // 2), a.load_seconds))
    lab.pid()
    runs = sat + fixed
    out = {"rps": rps, "rate": rate, "p50_us": statistics.median(r["p50_us"] for r in fixed),
           "p99_us": statistics.median(r["p99_us"] for r in fixed), "p99_runs": [r["p99_us"] for r in fixed],
           "requests": sum(r["sent"] for r in runs),
           "cpu_us": statistics.median(cpu_us), "loadavg": busy, "ref_rps": ref, "rel": rps / ref,
           "fixed_run_us": statistics.median(w[0] for w in waits),
           "fixed_wait_us": statistics.median(w[1] for w in waits)}

    def summary(runs, addr):
        return {"p50_us": statistics.median(r["p50_us"] for r in runs),
                "p99_us": statistics.median(r["p99_us"] for r in runs),
                "p99_runs": [r["p99_us"] for r in runs], "addr": addr, "requests": sum(r["sent"] for r in runs)}
    if others:
        out["at_proxy"], out["direct"] = summary(at_proxy, own), summary(straight, replica[0])
        out["light"] = dict(summary(light, None), rate=max(1, rate // 2))
    return out


# The synthetic background of `spare_cpu_sample`: shares of one core, spent in bursts of
# BURN_SPIN_MS by two processes, each in a session of its own (as each containerd shim is), so
# that CPU is taken at random moments by processes off the request's path. Their bursts are
# longer and fewer than the shims' wake-ups: a stand-in for the CPU taken, not for its pattern.
BURN_LEVELS, BURN_SPIN_MS = (0, 5, 10, 15, 20), 0.5
BURN_SRC = """
import sys, time
share, spin = float(sys.argv[1]) / 100, float(sys.argv[2]) / 1000
rest, end = spin * (1 / share - 1), time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    t = time.perf_counter() + spin
    while time.perf_counter() < t:
        pass
    time.sleep(rest)
"""


def run_ns(pid):
    """The CPU time a process has run, in ns (`/proc/<pid>/schedstat`, first field; its threads
    are its one thread here)."""
    return int(open(f"/proc/{pid}/schedstat").read().split()[0])


def with_background(lab, a, rate, pct):
    """One fixed-rate run on the client's path while two processes of this harness burn `pct`
    % of one core between them (none at 0). Returns the run and the share of a core they were
    measured to take over it (their run time over the run's wall time)."""
    procs = []
    try:
        for _ in range(2 if pct else 0):
            # Bounded in time by itself too, so a harness killed outright leaves nothing burning.
            procs.append(subprocess.Popen([sys.executable, "-c", BURN_SRC, str(pct / 2), str(BURN_SPIN_MS),
                                           str(a.load_seconds + 30)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        pause(0.2)  # the interpreters start before the window does
        n0, t0 = sum(run_ns(p.pid) for p in procs), time.monotonic()
        r = loadgen(lab, a, rate, a.load_seconds)
        n1, t1 = sum(run_ns(p.pid) for p in procs), time.monotonic()
        if any(p.poll() is not None for p in procs):
            raise Failed("a background process of the spare-CPU sample ended early: the sample has no background")
    finally:
        for p in procs:
            kill_group(p)
            p.wait()
    return r, (n1 - n0) / 1e9 / (t1 - t0) * 100


def spare_cpu_sample(lab, a, rate):
    """At 1 project, right after its load sample: `burn_repeats` rounds of fixed-rate runs at
    `rate` on the client's path, one per level of BURN_LEVELS in an order shuffled each round,
    with that share of a core taken by a synthetic background. The p99 against the spare CPU
    the machine has left: the curve the N-project sample, whose host spends more at idle, can
    be read against."""
    runs = {pct: [] for pct in BURN_LEVELS}
    rng = random.Random(0)
    for _ in range(a.burn_repeats):
        order = list(BURN_LEVELS)
        rng.shuffle(order)
        for pct in order:
            runs[pct].append(with_background(lab, a, rate, pct))
    lab.pid()
    return {pct: {"p99_us": statistics.median(r["p99_us"] for r, _ in rs), "p99_runs": [r["p99_us"] for r, _ in rs],
                  "p50_us": statistics.median(r["p50_us"] for r, _ in rs),
                  "burned_pct": statistics.median(b for _, b in rs), "requests": sum(r["sent"] for r, _ in rs)}
            for pct, rs in runs.items()}


# The host control's paths, in report order: luma-proxy in its container (the client's path of
# `loadgen`), nginx in a container deployed the same way (`NginxContainer`), then the two
# proxies run natively on this host in front of project 1's replica.
CONTROL_PATHS = ("container", "nginx-container", "luma-native", "nginx-native")
# The fair nginx of benches/compare.py, and its upstream line, which the control points at the replica.
NGINX_PEER, NGINX_UPSTREAM = "benches/peers/nginx.conf.in", "server 127.0.0.1:{backend_port};"
NGINX_TEMP = "proxy_temp_path {tmp}/proxy;"
NGINX_LISTEN = "listen 127.0.0.1:"


def peer_binary(a):
    """The native luma-proxy of the host control: beside luma in --bin-dir."""
    return os.path.join(os.path.dirname(a.luma), "luma-proxy")


def check_peers(a):
    """What the host control needs, checked before anything is deployed: (ok, why not)."""
    if not a.control_repeats or a.projects < 2:
        return True, ""
    if not shutil.which("nginx"):
        return False, ("the host control (--control-repeats) runs nginx beside luma-proxy, and nginx is not "
                       "installed: run benches/install-peers.sh, or pass --control-repeats 0")
    try:
        nginx_image.shared_libraries(shutil.which("nginx"))
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return False, (f"the host control builds an nginx image from this host's nginx, and cannot list its "
                       f"libraries ({e}); install ldd (libc-bin), or pass --control-repeats 0")
    if not os.access(peer_binary(a), os.X_OK):
        return False, (f"the host control runs {peer_binary(a)} natively, and it is missing: build it "
                       "(`cargo build --release -p luma-proxy`), point --bin-dir at it, or pass --control-repeats 0")
    return True, ""


def nginx_config(replica, tmp, port, h2_port, listen="127.0.0.1:"):
    """The fair peer of benches/compare.py, as it is, but for its upstream (the replica), its
    temp paths (all under `tmp`, so nginx makes nothing elsewhere) and, in a container, its
    listeners (`listen` "": every address of the container). As many workers as the proxy
    container has serving threads (one per CPU)."""
    with open(os.path.join(ROOT, NGINX_PEER)) as f:
        template = f.read()
    for line in (NGINX_UPSTREAM, NGINX_TEMP, NGINX_LISTEN):
        if line not in template:
            raise Failed(f"{NGINX_PEER} has no `{line}` line any more; update NGINX_UPSTREAM, NGINX_TEMP "
                         "and NGINX_LISTEN")
    temps = "".join(f"\n    {d}_temp_path {{tmp}}/{d};" for d in ("fastcgi", "uwsgi", "scgi"))
    template = (template.replace(NGINX_UPSTREAM, f"server {replica};").replace(NGINX_TEMP, NGINX_TEMP + temps)
                .replace(NGINX_LISTEN, f"listen {listen}"))
    return fill(template, {"workers": os.cpu_count() or 1, "tmp": tmp, "port": port, "h2_port": h2_port})


# A containerised nginx's access log as luma-proxy's container writes its own: one JSON line per
# request with the same fields, to stdout (so through the engine's log driver), gathered for up
# to 32 KiB or 50 ms per write (luma-proxy's access.rs: FLUSH_BYTES, GATHER).
NGINX_ACCESS_LOG = (
    "log_format luma escape=json '{\"ts\":$msec,\"host\":\"$host\",\"method\":\"$request_method\","
    "\"path\":\"$request_uri\",\"status\":$status,\"duration_s\":$request_time,\"route\":\"$host\","
    "\"backend\":\"$upstream_addr\",\"client\":\"$remote_addr:$remote_port\"}';\n"
    "    access_log /dev/stdout luma buffer=32k flush=50ms;")
NGINX_NO_ACCESS_LOG = "access_log off;"


class NginxContainer:
    """nginx in a container deployed as luma's proxy is: on Docker's default bridge with its
    port published on the client link's host address, so the client's load takes the proxy's
    path (DNAT, the host's FORWARD chain and luma's edge rules for that bridge), connected to
    project 1's network in front of its replica, and logging each request to stdout as luma's
    proxy does, with the same log rotation. It runs the fair peer's config otherwise, and the
    host's own nginx binary (`nginx_image`; nothing is pulled). Beside luma-proxy's container,
    it tells what the container shape costs any proxy from what it costs luma-proxy."""

    def __init__(self, lab, a, replica):
        self.lab, self.a, self.replica = lab, a, replica
        self.name, self.image = f"{lab.prefix}-nginx", f"{lab.prefix}-nginx:peer"
        self.port = None  # the one Docker publishes on, read back after the start
        self.made = False

    def start(self):
        self.made = True  # from the first command on, `stop` removes what there is
        conf = nginx_config(self.replica, nginx_image.HOME, nginx_image.PORT, nginx_image.PORT + 1, listen="")
        if NGINX_NO_ACCESS_LOG not in conf:
            raise Failed(f"{NGINX_PEER} has no `{NGINX_NO_ACCESS_LOG}` line any more; update NGINX_NO_ACCESS_LOG")
        # Its errors to `docker logs`, where a failure message can show them.
        # The whole line, so the template's comment on it ("without access logs") goes too.
        conf = re.sub(rf"{re.escape(NGINX_NO_ACCESS_LOG)}.*", lambda _: NGINX_ACCESS_LOG,
                      conf.replace(f"error_log {nginx_image.HOME}/nginx-error.log", "error_log stderr"))
        try:
            nginx_image.build(self.image, conf, docker, self.lab.tmp, binary=shutil.which("nginx"))
        except (OSError, ValueError, TypeError) as e:
            raise Failed(f"cannot make the host control's nginx image from this host's nginx: {e}")
        # luma's rotation of its proxy's logs (proxyctl.rs), where luma would apply it.
        logs = []
        if docker("info", "--format", "{{.LoggingDriver}}") == "json-file":
            logs = ["--log-opt", "max-size=20m", "--log-opt", "max-file=5"]
        # The port is Docker's pick: one free on the client link's address, where the proxy's is.
        docker("run", "-d", "--name", self.name, *logs, "-p", f"{self.lab.client.host_ip}::{nginx_image.PORT}",
               self.image)
        published = docker("port", self.name, f"{nginx_image.PORT}/tcp").splitlines()
        try:
            self.port = int(published[0].rsplit(":", 1)[1])
        except (IndexError, ValueError):
            raise Failed(f"`docker port {self.name}` named no published port: {published!r}") from None
        docker("network", "connect", f"{self.lab.project(1)}-network", self.name)
        try:
            wait_answers(self.lab.public[:1] + (self.port,), self.lab.host(1), self.lab.project(1), 30)
        except Failed as e:
            raise Failed(f"{e}\nthe host control's nginx container {self.name} logs:\n"
                         f"{docker('logs', '--tail', '10', self.name, check=False)}") from None
        self.load(0, 1)  # warm-up

    def load(self, rate, seconds):
        return loadgen(self.lab, self.a, rate, seconds, container=self.name, published=self.port)

    def stop(self):
        if self.made:
            docker("rm", "-f", "-v", self.name, timeout=120, check=False)
            docker("rmi", "-f", self.image, timeout=120, check=False)
            self.made = False


class NativePeers:
    """luma-proxy and nginx run natively on this host, both in front of project 1's replica
    address with as many workers as the proxy container has serving threads (one per CPU), access
    logs off and keep-alive to the replica (nginx: the fair peer of benches/compare.py, its
    upstream pointed at the replica); each listens on free ports of 127.0.0.1 only and runs in
    a session of its own under `lab.tmp`. Both are on the same footing, which the proxy container
    and a native nginx would not be: from 127.0.0.1, and over the host's bridge to the replica."""

    def __init__(self, lab, a, replica):
        self.lab, self.a, self.replica = lab, a, replica
        self.ports = dict(zip(("luma-native", "nginx-native", "nginx-h2c", "admin"), free_ports(4)))
        self.dir = os.path.join(lab.tmp, "peers")
        self.binary = peer_binary(a)
        self.procs = []

    def start(self):
        os.makedirs(self.dir, exist_ok=True)
        workers = os.cpu_count() or 1
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_config(self.replica, self.dir, self.ports["nginx-native"], self.ports["nginx-h2c"]))
        for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        state, admin = os.path.join(self.dir, "luma-state"), f"127.0.0.1:{self.ports['admin']}"
        self.spawn("nginx", ["nginx", "-e", f"{self.dir}/nginx-error.log", "-p", self.dir, "-c", conf,
                             "-g", "daemon off;"])
        # Every listener on 127.0.0.1, and no metrics listener (nginx has none either).
        self.spawn("luma-proxy", [self.binary, "serve", "--http", f"127.0.0.1:{self.ports['luma-native']}",
                                  "--admin", admin, "--state-dir", state, "--no-access-log", "--workers",
                                  str(workers), "--allow-literal-targets", "--https", "127.0.0.1:0",
                                  "--acme-directory", "off", "--metrics", "off"])
        for name in ("luma-native", "nginx-native", "admin"):
            self.wait_port(self.ports[name], name)
        run([self.binary, "deploy", "--admin", admin, "--state-dir", state, "--host", self.lab.host(1),
             "--project", "hostcontrol", "--target", self.replica], 60)
        for name in ("luma-native", "nginx-native"):
            self.load(name, 0, 1)  # warm-up

    def load(self, name, rate, seconds):
        """A loadgen run to the native peer `name`; Failed with its log's last lines (the run's
        directory is gone by the time anyone could read the file)."""
        try:
            return loadgen(self.lab, self.a, rate, seconds, port=self.ports[name], peer="its log below")
        except Failed as e:
            raise Failed(f"{e}\n{self.log_tail(name)}") from None

    def spawn(self, name, cmd):
        with open(os.path.join(self.dir, f"{name}.log"), "w") as err:
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))

    def wait_port(self, port, name):
        wait_listening(port, self.procs, lambda: f"the host control's {name} did not listen on 127.0.0.1:{port}:\n"
                       f"{self.log_tail('nginx-native')}\n{self.log_tail('luma-native')}")

    def log_tail(self, name):
        """The last lines of a peer's log, for a failure message."""
        path = f"{self.dir}/{'nginx-error' if name.startswith('nginx') else 'luma-proxy'}.log"
        try:
            with open(path, errors="replace") as f:
                return f"{name}'s log ends:\n" + "".join(f.readlines()[-10:])
        except OSError as e:
            return f"{name}'s log cannot be read ({e})"

    def stop(self):
        for p in self.procs:
            kill_group(p)
            p.wait()
        self.procs = []


def control_round(lab, a, rate, peers, nginx, rng, into):
    """One fixed-rate run on each of CONTROL_PATHS, in an order shuffled each round."""
    order = list(CONTROL_PATHS)
    rng.shuffle(order)
    for path in order:
        if path == "container":
            into[path].append(loadgen(lab, a, rate, a.load_seconds))
        elif path == "nginx-container":
            into[path].append(nginx.load(rate, a.load_seconds))
        else:
            into[path].append(peers.load(path, rate, a.load_seconds))


def idle_container(lab, k):
    return f"{lab.prefix}-idle{k:0{lab.width}d}"


def host_control_sample(lab, a, rate):
    """At 1 project: `control_repeats` rounds of control_round without, then with, N-1 idle
    containers of the demo image (`--network none`: no network, no route, no health check, no
    traffic; each with its cgroups and containerd shim like a replica). Then the containers go,
    and the native peers stop, before project 2 is deployed. Returns {"without"|"with": {path:
    summary}, "containers": N-1}."""
    n = a.projects - 1
    replica, _ = lab.replica_addr(1)
    peers = NativePeers(lab, a, replica)
    nginx = NginxContainer(lab, a, replica)
    rng = random.Random(1)
    runs = {k: {path: [] for path in CONTROL_PATHS} for k in ("without", "with")}
    names = [idle_container(lab, k) for k in range(1, n + 1)]
    try:
        peers.start()
        nginx.start()
        for _ in range(a.control_repeats):
            control_round(lab, a, rate, peers, nginx, rng, runs["without"])
        for k, name in enumerate(names, 1):
            docker("run", "-d", "--name", name, "--network", "none", a.image)
            if k % 50 == 0 or k == n:
                log(f"    host control: {k} of {n} idle containers started")
        pause(a.settle)  # the engine's work of starting them is over
        for _ in range(a.control_repeats):
            control_round(lab, a, rate, peers, nginx, rng, runs["with"])
    finally:
        peers.stop()
        # The idle containers first, 10 per `docker rm` (which removes its names concurrently),
        # and nginx's container after them: Docker 20.10's network code once deadlocked with 50
        # removals at once right after nginx's, and every later engine call hung (this
        # harness, 2026-11-30; the engine had to be restarted).
        for k in range(0, len(names), 10):
            docker("rm", "-f", "-v", *names[k:k + 10], timeout=300, check=False)
        nginx.stop()
    left = [name for name in docker("ps", "-a", "--format", "{{.Names}}").split() if name in {*names, nginx.name}]
    if left:
        raise Failed(f"the host control's containers are still there after `docker rm -f`: {left[:5]}")
    lab.pid()

    def summary(rs):
        return {"p99_us": statistics.median(r["p99_us"] for r in rs), "p99_runs": [r["p99_us"] for r in rs],
                "p50_us": statistics.median(r["p50_us"] for r in rs), "requests": sum(r["sent"] for r in rs)}
    out = {k: {path: summary(rs) for path, rs in v.items()} for k, v in runs.items()}
    return dict(out, containers=n, replica=replica, image=a.image)


# luma's default network pool (luma-cli/src/netpool.rs): 10.210.0.0/16 in /24s, 256 networks
# for the whole engine. Above this many projects the run needs room (see `network_env`);
# the margin leaves a few subnets to other luma projects on the engine.
POOL_PREFIX, SUBNET_SIZE, MAX_SUBNET_SIZE = 16, 24, 28
DEFAULT_POOL_ROOM = 250


def network_env(projects):
    """The network pool settings this run adds to luma's environment. Up to 250 projects: none
    (the default pool). More, with neither LUMA_NETWORK_POOL nor LUMA_NETWORK_SUBNET_SIZE set:
    smaller subnets of the same pool (the largest that fits: /26 is 1024 networks of 61
    containers, where a project here needs 3: its replica, the next release's, the proxy), since that pool is the one luma already checks clear
    of the host's routes. Set by the user: checked to hold the projects (ValueError if not)."""
    pool, size = os.environ.get("LUMA_NETWORK_POOL"), os.environ.get("LUMA_NETWORK_SUBNET_SIZE")
    if pool is None and size is None:
        if projects <= DEFAULT_POOL_ROOM:
            return {}
        for s in range(SUBNET_SIZE + 1, MAX_SUBNET_SIZE + 1):
            # The same share of headroom as 250 of 256.
            if 2 ** (s - POOL_PREFIX) * DEFAULT_POOL_ROOM // 2 ** (SUBNET_SIZE - POOL_PREFIX) >= projects:
                return {"LUMA_NETWORK_SUBNET_SIZE": str(s)}
        raise ValueError(f"--projects {projects}: more project networks than luma's default pool 10.210.0.0/16 "
                         f"holds even in /{MAX_SUBNET_SIZE}s; set LUMA_NETWORK_POOL to a larger pool (e.g. a /12)")
    m = re.fullmatch(r"[0-9.]+/(\d+)", pool or "10.210.0.0/16")
    try:
        room = 2 ** (int(size or SUBNET_SIZE) - int(m.group(1)))
    except (AttributeError, ValueError):
        return {}  # luma itself rejects a malformed setting, with the fix
    if projects > room:
        raise ValueError(f"--projects {projects}: LUMA_NETWORK_POOL={pool or '(default 10.210.0.0/16)'} with "
                         f"LUMA_NETWORK_SUBNET_SIZE={size or SUBNET_SIZE} holds only {room} project networks; "
                         "set a larger pool or a smaller subnet (a larger size)")
    return {}


def pool_note(a):
    if not a.net_env:
        return ""
    return " (project networks from " + ", ".join(f"{k}={v}" for k, v in a.net_env.items()) + ")"


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


def load_row(label, r):
    """A row of the requests table."""
    runs = r["p99_runs"]
    return (f"| {label} | {r['rps']:,.0f} | {r['ref_rps']:,.0f} | {r['rel']:.3f} | {r['p99_us'] / 1000:.2f} ms | "
            f"{min(runs) / 1000:.2f}–{max(runs) / 1000:.2f} ms | "
            f"{r['p50_us'] / 1000:.2f} ms | {r['cpu_us']:.1f} µs | {r['requests']:,} | {r['loadavg']:.2f} |")


def p99_spread(r, base):
    """The ratios of `r`'s p99 runs to `base`'s that their spreads allow: (lowest, highest)."""
    lo = min(r["p99_runs"]) / max(max(base["p99_runs"]), 1)
    hi = max(r["p99_runs"]) / max(min(base["p99_runs"]), 1)
    return lo, hi


def ratio_row(label, r, base):
    """The requests table's ratios of `r` to `base`."""
    def x(key, floor=0):
        return f"{r[key] / max(base[key], floor):.2f}x" if max(base[key], floor) > 0 else "-"
    lo, hi = p99_spread(r, base)
    return (f"| {label} | {x('rps')} | {x('ref_rps')} | {x('rel')} | {x('p99_us', 1)} | {lo:.2f}–{hi:.2f}x | "
            f"{x('p50_us', 1)} | {x('cpu_us')} | | |")


def p99_noise_note(p1, pn):
    """Whether the p99 ratio is larger than what repeating the same sample gives (nothing to say
    with one run per sample)."""
    if min(len(p1["p99_runs"]), len(pn["p99_runs"])) < 2:
        return "With one fixed-rate run per sample there is no spread to compare."
    spread = max(max(r["p99_runs"]) / max(min(r["p99_runs"]), 1) for r in (p1, pn))
    lo, hi = p99_spread(pn, p1)
    verdict = ("it holds 1.0, so the difference between the rows is within what repeating a row gives"
               if lo <= 1 <= hi else
               f"it {'overlaps' if lo <= 1.1 and hi >= 0.9 else 'lies outside'} 0.90–1.10x")
    return (f"In this run the same sample repeated gave p99s up to {spread:.2f}x apart; the range of the p99 "
            f"ratio those runs allow is {lo:.2f}–{hi:.2f}x: {verdict}.")


def background_us(idle, k, r):
    """The proxy's idle CPU at k projects spread over the requests of load sample `r`, in µs
    per request: the part of its CPU per request that is not the requests'."""
    return idle[k]["cpu_pct"] / 100 / r["rps"] * 1e6 if k in idle and r["rps"] else float("nan")


def host_rules_note(rules, n):
    """The sentences on the host's FORWARD and DOCKER-ISOLATION-STAGE-1 chains."""
    def count(k, chain):
        v = rules[k][chain]
        return f"{v}" if isinstance(v, int) else f"unknown ({v})"
    chains = "; ".join(f"{chain}: {count(1, chain)} at 1 project, {count(n, chain)} at {n}" for chain in HOST_CHAINS)
    return (f"Rules in the host's iptables chains just before the load runs (`iptables -w 5 -S CHAIN`, the `-A` "
            f"lines): {chains}. A packet between the proxy and a replica crosses its project network's bridge; with "
            f"`net.bridge.bridge-nf-call-iptables` at 1 (here: {bridge_nf()}) the host's FORWARD chain sees it, and "
            "its rules, with the chains they jump to, are matched one after another until one decides. A packet "
            "between the client and the proxy is routed between the client's link and the bridge of the proxy's "
            "network, and the FORWARD chain sees it too, both ways.")


def fast_path_note(lab, a, off):
    """The sentences on luma's host fast path in this run: on, made by the run, pre-existing,
    or unavailable, and whether the load sample without it was taken."""
    fp, n = lab.fast_path, a.projects
    pool = f"`{fp['pool']}`"
    text = [f"luma's host fast path is one rule in {USER_CHAIN} (processed before Docker's own rules) that accepts "
            f"established traffic within its network pool {pool} before the per-network rules see it, and two "
            "\"edge\" rules per uplink of the host that accept the established, DNATed packets between that uplink "
            "and the bridge of the proxy's published ports (the client's leg)."]
    if not fp["on"]:
        text.append(f"luma ran with {fast_path_setting(lab)}" + (" (`--no-fast-path`)." if a.no_fast_path else "."))
    state = fp["state"]
    if state == "unavailable":
        text.append(f"Whether the rule was there could not be checked ({fp['reason']}); it was neither "
                    "compared nor removed.")
    elif state == "pre-existing":
        text.append("The rule was there before this run, so it is not this run's: it was left in place, and the "
                    "load samples without it were skipped.")
        if fp["edges"]:
            text.append(f"This run's luma added {len(fp['edges'])} edge rules for its proxy, in place during every "
                        "load sample; the clean-up removes them.")
    elif state == "absent":
        text.append(f"The fast path was {'off' if not fp['on'] else 'not set up: luma did not add the rule'}; no "
                    f"rule for {pool} was in {USER_CHAIN} at {n} projects.")
    else:  # made
        shown = ", ".join(f"`{' '.join(r[r.index('--comment') + 1:r.index('--comment') + 2])}`"
                          for r in fp["edges"] if "--comment" in r) or "none"
        text.append("This run's luma added the rule (it was absent before the run) and these edge rules: "
                    f"{shown}; the clean-up removes them.")
        if fp["edges"] and off:
            text.append(f"The row \"{n}, without the edge rules\" repeats the {n}-project load sample right after "
                        "it, at the same fixed rate, with only the edge rules deleted (the pool's rule kept): the "
                        "client's leg through all of Docker's rules, the proxy's leg not; then they were put back.")
        if off:
            text.append(f"The row \"{n}, without the fast path\" repeats the {n}-project load sample right after "
                        "it, at the same fixed rate, with these rules deleted; then they were put back where luma "
                        f"inserts them (before the first bare `-j RETURN` of {USER_CHAIN}, or at its end).")
        elif a.smoke:
            text.append("The load sample without it is skipped with --smoke.")
        else:
            text.append("No load sample without it was taken (luma ran with the fast path off).")
    return " ".join(text)


def idle_by_process(idle, top=6):
    """The table of where the whole machine's idle CPU goes at each sample, by process name:
    the names busiest at the largest sample, then the rest summed."""
    if not idle or not all("by_name" in s for s in idle.values()):
        return []

    def cell(name):  # a process name is anyone's text: keep it from breaking the table
        return name.replace("|", "/").replace("`", "'")
    last = idle[max(idle)]["by_name"]
    names = sorted(last, key=last.get, reverse=True)[:top]
    lines = ["Where the whole machine's idle CPU goes, by process name (utime+stime of every process over the same "
             "window, `/proc/<pid>/stat`, summed by name, in % of one core; the names busiest at the last sample, "
             "then the rest; processes started or ended inside the window and interrupt time are in neither):",
             "",
             "| projects deployed | " + " | ".join(f"`{cell(n)}`" for n in names) + " | the rest |",
             "|---:|" + "---:|" * (len(names) + 1)]
    for k in sorted(idle):
        b = idle[k]["by_name"]
        rest = sum(v for n, v in b.items() if n not in names)
        lines.append(f"| {k} | " + " | ".join(f"{b.get(n, 0):.2f} %" for n in names) + f" | {rest:.2f} % |")
    return lines + [""]


def direct_section(p1, pn, n):
    """The table of the same fixed-rate load on three paths (a remote client's, the proxy's
    address from this host, the replica's address): which leg the tail at n projects grows on."""
    if "direct" not in p1 or "direct" not in pn:
        return []
    paths = [("a client's, through DNAT and FORWARD (the table above): client leg, luma-proxy, replica leg", None),
             ("the proxy's address from this host: luma-proxy, replica leg", "at_proxy"),
             ("the replica's address from this host: no proxy", "direct")]

    def of(r, key):
        return r if key is None else r[key]

    lines = ["### Which leg the tail grows on: the same load on three paths", "",
             f"| path | p99 at 1 project | run to run | p99 at {n} | run to run | p99 {n} / 1 | range the runs allow "
             f"| p50 {n} / 1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, key in paths:
        a, b = of(p1, key), of(pn, key)
        lo, hi = p99_spread(b, a)
        lines.append(f"| {label} | {a['p99_us'] / 1000:.2f} ms | {min(a['p99_runs']) / 1000:.2f}–"
                     f"{max(a['p99_runs']) / 1000:.2f} ms | {b['p99_us'] / 1000:.2f} ms | "
                     f"{min(b['p99_runs']) / 1000:.2f}–{max(b['p99_runs']) / 1000:.2f} ms | "
                     f"{b['p99_us'] / max(a['p99_us'], 1):.2f}x | {lo:.2f}–{hi:.2f}x | "
                     f"{b['p50_us'] / max(a['p50_us'], 1):.2f}x |")
    side = sum(r[k]["requests"] for r in ({id(p1): p1, id(pn): pn}.values()) for k in ("at_proxy", "direct"))
    return lines + [
        "",
        "Each fixed-rate run from the client namespace (the table above) was followed at once by one at the same "
        f"rate and for as long from this host to the proxy's address on project 1's network (`{p1['at_proxy']['addr']}` "
        f"at 1 project, `{pn['at_proxy']['addr']}` at {n}), then one to project 1's replica "
        f"(`{p1['direct']['addr']}`, `{pn['direct']['addr']}`); medians of {len(p1['direct']['p99_runs'])} runs each, "
        f"{side:,} requests in all, all 2xx (`luma-loadgen --local-link`). From this host, a container's address is "
        "reached without DNAT, and its packets meet no FORWARD rule on the way in or out (the host reaches its "
        "bridges through OUTPUT and INPUT): the proxy's address leaves out the client's leg; the replica's leaves "
        "out the proxy and both legs. The proxy's leg to the replica is bridged inside the project's network, "
        "where luma's fast path takes established packets out of FORWARD; the client's leg is routed between the "
        "client's link and the proxy's network, where luma's edge rules do the same, when it added them (the "
        "note on the host's forwarding rules below says). The load generator, the replica and the machine "
        "are the same, the next moment. The inference runs one way: a p99 that grows from 1 to "
        f"{n} projects on the replica's path grows with the host (its other processes, interfaces and timers); "
        "one that grows on the client's path more than at the proxy's address grows on the client's leg (DNAT "
        "and the FORWARD rules it walks); one that grows at the proxy's address but not at the replica's is "
        "luma-proxy's, or its leg to the replica (the sample without the fast path above tells those apart).",
        "",
    ]


def spare_section(p1, pn, idle, n, spare):
    """The tail against the machine's spare CPU: at 1 project with a synthetic background
    (`spare_cpu_sample`), beside the N-project sample and the idle CPU its host spends more;
    and both samples at half the fixed rate, where the machine has more to spare."""
    lines = ["### The tail and the machine's spare CPU", "",
             f"| projects | the proxy's threads on a CPU, per request at {p1['rate']:,} req/s | runnable but waiting "
             "for a CPU, per request | waiting over running |",
             "|---:|---:|---:|---:|"]
    for label, r in (("1", p1), (f"{n}", pn)):
        lines.append(f"| {label} | {r['fixed_run_us']:.1f} µs | {r['fixed_wait_us']:.1f} µs | "
                     f"{r['fixed_wait_us'] / max(r['fixed_run_us'], 1e-9):.2f} |")
    lines += ["",
              "Over each fixed-rate run on the client's path, the sums over the proxy's threads of "
              "`/proc/<pid>/task/*/schedstat` (the scheduler's time on a CPU, and its time runnable but not "
              "running), divided by the requests; medians of the runs. They include the proxy's background work "
              "during the runs (health checks, re-resolves). The time on a CPU includes the kernel's packet work "
              "done in the proxy's threads unless the kernel counts softirq time apart (CONFIG_IRQ_TIME_ACCOUNTING; "
              f"this one: {kernel_option('CONFIG_IRQ_TIME_ACCOUNTING')}). Each serving thread runs its own "
              "connections, so while it waits for a CPU, so do the requests on them.", ""]
    if spare:
        extra = idle[n]["host_pct"] - idle[1]["host_pct"]
        base = spare[0]
        top = max(spare[pct]["burned_pct"] for pct in BURN_LEVELS)
        lines += [f"| sample at {p1['rate']:,} req/s | background added (measured) | p99 | run to run | p99 over no background "
                  "at 1 project | range the runs allow | p50 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for pct in BURN_LEVELS:
            r = spare[pct]
            lo, hi = p99_spread(r, base)
            lines.append(f"| 1 project, {pct} % of a core burned | {r['burned_pct']:.1f} % | {r['p99_us'] / 1000:.2f} ms | "
                         f"{min(r['p99_runs']) / 1000:.2f}–{max(r['p99_runs']) / 1000:.2f} ms | "
                         f"{r['p99_us'] / max(base['p99_us'], 1):.2f}x | {lo:.2f}–{hi:.2f}x | {r['p50_us'] / 1000:.2f} ms |")
        lo, hi = p99_spread(pn, base)
        lines.append(f"| {n} projects (the table above) | {extra:.1f} % more at idle than at 1 | {pn['p99_us'] / 1000:.2f} ms | "
                     f"{min(pn['p99_runs']) / 1000:.2f}–{max(pn['p99_runs']) / 1000:.2f} ms | "
                     f"{pn['p99_us'] / max(base['p99_us'], 1):.2f}x | {lo:.2f}–{hi:.2f}x | {pn['p50_us'] / 1000:.2f} ms |")
        runs = len(base["p99_runs"])
        lines += ["",
                  f"Right after the 1-project sample, {runs} round{'s' if runs != 1 else ''} of fixed-rate runs on the client's path at the same "
                  f"rate, one per background level in an order shuffled each round (medians of {runs}; "
                  f"{sum(r['requests'] for r in spare.values()):,} requests, all 2xx). The background is two processes "
                  f"of this harness, each in a session of its own, that spin for {BURN_SPIN_MS:g} ms and sleep, sized "
                  "to take the level's share of one core between them; measured: their run time "
                  "(`/proc/<pid>/schedstat`) over the run's wall time (under contention they get less than the "
                  f"level). They stand in for the CPU the host spends at {n} projects beyond 1 with no traffic (the "
                  f"idle table above: the whole machine's idle CPU, {extra:.1f} % of a core more; the table after it "
                  "says which processes), not for its pattern: their bursts are longer and fewer than the shims' "
                  "wake-ups, and what the host spends at idle is not what it spends under load. The curve is taken minutes before the N-project row; "
                  "the machine reference above says how far the machine's speed moved in between."
                  + (f" The N-project row's extra idle CPU is beyond the largest background measured ({top:.1f} %): "
                     "it lies off the curve." if extra > top else ""), ""]
    if "light" in p1 and "light" in pn:
        a1, b1 = p1["light"], pn["light"]
        lo, hi = p99_spread(b1, a1)
        lines += [f"| projects | p99 at {a1['rate']:,} req/s | run to run | p50 |",
                  "|---|---:|---:|---:|",
                  f"| 1 | {a1['p99_us'] / 1000:.2f} ms | {min(a1['p99_runs']) / 1000:.2f}–{max(a1['p99_runs']) / 1000:.2f} ms | "
                  f"{a1['p50_us'] / 1000:.2f} ms |",
                  f"| {n} | {b1['p99_us'] / 1000:.2f} ms | {min(b1['p99_runs']) / 1000:.2f}–{max(b1['p99_runs']) / 1000:.2f} ms | "
                  f"{b1['p50_us'] / 1000:.2f} ms |",
                  f"| {n} / 1 | {b1['p99_us'] / max(a1['p99_us'], 1):.2f}x (range the runs allow: {lo:.2f}–{hi:.2f}x) | | "
                  f"{b1['p50_us'] / max(a1['p50_us'], 1):.2f}x |",
                  "",
                  f"The same client's path at half the fixed rate ({a1['rate']:,} req/s, a quarter of the 1-project "
                  f"saturation rate), one run after each pair of runs on the other paths; medians of "
                  f"{len(a1['p99_runs'])}. Further from saturation, queueing magnifies less of any added time, whether "
                  "it is added per request or by other processes: this row says how the growth depends on the load, "
                  "not which of the two it is (the synthetic background above speaks to that).", ""]
    return lines


def control_section(pn, ctl, n, rate):
    """The host control (`host_control_sample`): the tail with and without N-1 idle containers,
    for luma-proxy and nginx each in a container, and run natively, side by side."""
    if not ctl:
        return []
    k = ctl["containers"]
    labels = {"container": "luma-proxy in its container: the client's path (as in the tables above)",
              "nginx-container": "nginx in a container deployed the same way: the client's path",
              "luma-native": "luma-proxy run natively on this host, from 127.0.0.1",
              "nginx-native": "nginx run natively on this host, from 127.0.0.1"}
    lines = [f"### The tail and the host: {k} idle containers, and nginx beside luma-proxy", "",
             f"| path, at {rate:,} req/s | p99 at 1 project | run to run | with {k} idle containers | run to run "
             "| with / without | range the runs allow | p50 with / without |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for path in CONTROL_PATHS:
        a, b = ctl["without"][path], ctl["with"][path]
        lo, hi = p99_spread(b, a)
        lines.append(f"| {labels[path]} | {a['p99_us'] / 1000:.2f} ms | {min(a['p99_runs']) / 1000:.2f}–"
                     f"{max(a['p99_runs']) / 1000:.2f} ms | {b['p99_us'] / 1000:.2f} ms | {min(b['p99_runs']) / 1000:.2f}–"
                     f"{max(b['p99_runs']) / 1000:.2f} ms | {b['p99_us'] / max(a['p99_us'], 1):.2f}x | {lo:.2f}–{hi:.2f}x | "
                     f"{b['p50_us'] / max(a['p50_us'], 1):.2f}x |")
    base = ctl["without"]["container"]
    runs = len(base["p99_runs"])
    requests = sum(r["requests"] for v in (ctl["without"], ctl["with"]) for r in v.values())
    return lines + [
        "",
        f"At 1 project, after its other samples: {runs} round{'s' if runs != 1 else ''} of fixed-rate runs, one on each "
        f"path in an order shuffled each round, without and then with {k} containers of `{ctl['image']}` started "
        "with `--network none`: no network, so no route in the proxy, no health check and no traffic; each is "
        "a container as a replica is, minus its network (its cgroups, its containerd shim, a process asleep in "
        "`accept`). Then they were removed, before project 2 was deployed. nginx's container is made from this "
        "host's nginx binary and the fair peer's config (`benches/nginx_image.py`) and deployed as luma's proxy "
        "is: on Docker's default bridge with its port published on the same address of the client's link (the "
        "same DNAT, FORWARD chain and edge rules), connected to project 1's network in front of the same "
        "replica, with as many workers, and writing a JSON access-log line per request to stdout, as luma's "
        "proxy does (through the engine's log driver, with the same rotation). Both native proxies run as many workers "
        "as the proxy container has serving threads (one per CPU), with access logs off and keep-alive "
        f"connections to project 1's replica (`{ctl['replica']}`), reached from 127.0.0.1 over the host's bridge "
        "(no DNAT, no FORWARD rule): the same footing for both, which the container and a native nginx would not "
        f"be; medians of {runs}, {requests:,} requests, all 2xx. Reading: where nginx's p99 grows with the idle "
        "containers as luma-proxy's does, natively and in a container alike, the growth is the host's, from what "
        "every container adds to it, and not luma-proxy's. This control leaves out what the N projects add besides containers (networks, "
        "routes, health checks, the host's rules); for comparison, the client's path measured "
        f"{pn['p99_us'] / 1000:.2f} ms at {n} projects (the table above): {pn['p99_us'] / max(base['p99_us'], 1):.2f}x "
        "this control's runs without the idle containers.",
        "",
    ]


def report(lab, a, deploys, idle, nets, load, rules, vers, total_s):
    n = a.projects
    med = statistics.median(deploys)
    worst = max(range(n), key=lambda k: deploys[k])
    p1, pn, off, no_edge = load[1], load[n], load.get("no_fast_path"), load.get("no_edge")
    lines = [
        "# Scale: many projects behind one proxy",
        "",
        f"Generated by `benches/scale.py` on {time.strftime('%Y-%m-%d')}; command: "
        f"`benches/scale.sh{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.",
        "",
        f"- Machine: {machine()}; Docker engine {vers['docker']}.",
        f"- Versions: {vers['luma']}, {vers['proxy']} (image `{lab.env['LUMA_PROXY_IMAGE']}` {vers['proxy_image']}), "
        f"commit {vers['commit']}.",
        f"- Setup: {n} projects, each one app of 1 replica (`{a.image}`, health check `/up` every {a.check_interval + ' (`--check-interval`)' if a.check_interval else '1 s, the default'}), "
        "each with its own host and network, deployed one after another with `luma deploy` to one engine "
        f"with one luma-proxy{pool_note(a)}. Whole run: {total_s / 60:.1f} min.",
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
        "| projects deployed | proxy networks (project networks) | RSS | idle CPU | DNS queries/s | whole machine's idle CPU |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k in sorted(idle):
        s = idle[k]
        lines.append(f"| {k} | {nets[k][0]} ({nets[k][1]}) | {s['rss_mib']:.1f} MiB | {s['cpu_pct']:.2f} % | "
                     f"{s['dns_qps']:.2f} | {s['host_pct']:.1f} % |")
    lines += [
        "",
        f"Measured {a.settle:g} s after the last deploy, over a {a.window:g} s window with no traffic. "
        "Proxy networks: the networks the proxy container is on (`docker inspect`), with this run's project "
        "networks in brackets. RSS: `VmRSS` of the proxy's main process. Idle CPU: its utime+stime over the "
        "window, in % of one core; this is the cost of health checks (one per replica per second) and of "
        "re-resolving routes in the background. DNS queries/s: the increase of `luma_proxy_dns_queries_total` "
        "(`luma-proxy metrics`; DNS look-ups the proxy sent to Docker's DNS) over the window, divided by it; the run fails above k / (0.75 x 30 s) + 1 at k projects (each route "
        "re-resolves in the background every 30 s +-25%). Whole machine's idle CPU: the busy time of all "
        "CPUs (`/proc/stat`) over the same window, in % of one core: the proxy, the replicas answering its "
        "health checks, their containerd shims, the engine and anything else running.",
        "",
        *idle_by_process(idle),
        "## Requests through one host",
        "",
        f"| projects deployed | req/s | machine reference req/s | req/s over reference | p99 at {p1['rate']:,} req/s "
        f"| p99 run to run | p50 at {p1['rate']:,} req/s | proxy CPU per request | requests (all 2xx) "
        "| load average before |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        load_row("1", p1),
        load_row(f"{n}", pn),
        *([load_row(f"{n}, without the edge rules", no_edge)] if no_edge else []),
        *([load_row(f"{n}, without the fast path", off)] if off else []),
        ratio_row(f"{n} / 1", pn, p1),
        *([ratio_row(f"{n}, without the edge rules / 1", no_edge, p1)] if no_edge else []),
        *([ratio_row(f"{n}, without the fast path / 1", off, p1)] if off else []),
        "",
        f"All from the client namespace `{lab.client.ns}` ({lab.client.subnet}.2) to the proxy's port published "
        f"on {lab.client.host_ip} (the namespace's link to this host), with project 1's host `{lab.host(1)}`, "
        f"{a.connections} keep-alive connections. req/s: `luma-loadgen --rate 0` (closed loop, as fast as "
        f"possible) for {a.load_seconds:g} s, after a 1 s warm-up, median of {a.repeats}. p99 and p50: "
        f"`luma-loadgen --rate {p1['rate']}` (open loop, latency counted from when each request was due) for "
        f"{a.load_seconds:g} s, median of {a.p99_repeats}; the rate is half the 1-project saturation rate and the "
        "same every time. p99 run to run: the lowest and highest p99 of those runs, with nothing changed between "
        "them (at 1 and at N projects each is followed by runs on two other paths, below); in a ratio row, the lowest and highest ratio they allow (a row's lowest over the "
        "1-project row's highest, and the other way round). " + p99_noise_note(p1, pn) + " The goal is the req/s "
        "and p99 ratios within 10%. Machine reference: the same closed-loop load against a native luma-demo-backend on "
        "127.0.0.1, no proxy and no container, just before each sample (median of "
        f"{a.repeats} runs of {max(1.0, a.load_seconds / 2):g} s): this machine's speed drifts by tens of percent "
        "between samples minutes apart, so req/s over it is the figure to compare across rows. The load generator, the proxy and the one demo replica share this machine's cores; the "
        "1-minute load average just before each measurement shows whether anything else was running.",
        "",
        "Proxy CPU per request: the proxy process's user+system time (utime+stime of its main process in "
        "`/proc/<pid>/stat`, all its threads) over each saturation run, divided by the requests that run sent; "
        f"median of {a.repeats}. The system time includes the kernel's work on the packets the proxy sends, such "
        "as the host's FORWARD rules they pass on their way to the replica, when that work runs in the proxy's "
        "context (a kernel built with CONFIG_IRQ_TIME_ACCOUNTING counts softirq time apart instead; this one: "
        f"{kernel_option('CONFIG_IRQ_TIME_ACCOUNTING')}). Unlike req/s, which also moves with the load generator "
        "and the replica on the same cores, it is what shows the per-request cost in the proxy. It also holds the "
        "proxy's background work during the runs (health checks, re-resolves): at the idle CPU above, about "
        f"{background_us(idle, 1, p1):.1f} µs per request at 1 project and {background_us(idle, n, pn):.1f} µs "
        f"at {n}.",
        "",
        *direct_section(p1, pn, n),
        *spare_section(p1, pn, idle, n, load.get("spare")),
        *control_section(pn, load.get("control"), n, p1["rate"]),
        "## The host's forwarding rules",
        "",
        host_rules_note(rules, n) + " " + fast_path_note(lab, a, off),
        "",
        f"At the end all {n} hosts answered 200 from their own project. Reproduce: `benches/scale.sh"
        f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`.",
        "",
    ]
    return "\n".join(lines)


def fast_path_ab(lab, a, load):
    """At N projects, right after the load sample: records what became of luma's fast-path
    rule (lab.fast_path["state"]) and, when this run's luma added it with the fast path on,
    takes one more load sample with it and the edge rules for this run's proxy deleted
    (load["no_fast_path"], the same fixed rate), then puts them back where luma inserts them,
    so the final check and the clean-up see the normal state. Before that, when luma added edge
    rules for this run's proxy, one sample with only those deleted (load["no_edge"]): the
    client's leg without them. A failure in between leaves rules deleted, as before the run,
    which is what the clean-up restores anyway. A rule there before the run is someone else's: never
    touched. --smoke skips the extra sample to stay short."""
    fp = lab.fast_path
    if fp["before"] is None:
        fp["state"] = "unavailable"
    elif fp["before"]:
        fp["state"] = "pre-existing"
    else:
        fp["state"] = "made" if lab.fast_path_present() else "absent"
    if fp["state"] != "unavailable":
        fp["edges"] = lab.edge_rules_made()
    skip = ("this run's luma did not add the rule" if fp["state"] != "made" else
            fast_path_setting(lab) if not fp["on"] else "--smoke" if a.smoke else None)
    if skip:
        log(f"    fast path at {a.projects}: {fp['state']}; no load sample without it ({skip})")
        return
    edges = fp["edges"]
    if edges:
        load["no_edge"] = sample_without(lab, a, load, f"luma's {len(edges)} edge rules (the pool's rule kept)",
                                         "the edge rules", edges, pool=False)
    load["no_fast_path"] = sample_without(lab, a, load, f"luma's rule for {fp['pool']} and its {len(edges)} edge "
                                          "rules", "the fast path", edges, pool=True)


def sample_without(lab, a, load, deleted, label, edges, pool):
    """One load sample at N, at the 1-project fixed rate, with these of luma's rules deleted:
    the edge rules `edges`, and the pool's rule when `pool`; then they are put back where luma
    inserts them. Failed when luma put any back during the sample (another luma deployed)."""
    if pool:
        lab.remove_fast_path()
    lab.remove_edge_rules(edges)
    log(f"    fast path at {a.projects}: deleted {deleted} for one load sample without them")
    r = load_sample(lab, a, load[1]["rate"], others=False)
    if lab.edge_rules_made():
        raise Failed(f"luma's edge rules for {lab.proxy} came back in {USER_CHAIN} during the load sample "
                     "without them (another luma deployed?): that sample is not one without them")
    if pool:
        lab.restore_fast_path()
    for spec in edges:
        insert_before_return(spec)
    log(f"    load at {a.projects} without {label}: {r['rps']:,.0f} req/s, proxy CPU {r['cpu_us']:.1f} µs "
        f"per request; p99 {r['p99_us'] / 1000:.2f} ms at {r['rate']} req/s; all {r['requests']:,} requests 2xx; "
        "rules put back")
    return r


def scale(lab, a, at):
    """The run: deploys, samples, load runs, the final check; raises Failed or Interrupted."""
    started = time.monotonic()
    lab.client.create()
    log(f"client namespace {lab.client.ns}: {lab.client.subnet}.2 -> {lab.client.host_ip}:{lab.http} "
        f"(the proxy's published port) over {lab.client.host_if}")
    deploys, idle, nets, load, rules = [], {}, {}, {}, {}
    for i in range(1, a.projects + 1):
        t = time.monotonic()
        lab.luma(i, "deploy", timeout=a.deploy_timeout)
        took = time.monotonic() - t
        deploys.append(took)
        # `luma deploy` returns once the host is switched; the poll proves it from outside.
        ready = wait_answers(lab.public, lab.host(i), lab.project(i), 60)
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
            idle[i] = idle_sample(lab, a, i)
            s = idle[i]
            log(f"    idle at {i}: RSS {s['rss_mib']:.1f} MiB, CPU {s['cpu_pct']:.2f} % of a core, "
                f"DNS {s['dns_qps']:.2f} queries/s over {a.window:g} s (at most {dns_bound(i):.2f})")
        if i in (1, a.projects):
            rules[i] = host_rules()
            load[i] = load_sample(lab, a, load[1]["rate"] if i > 1 else None)
            if i == 1 and a.burn_repeats:
                load["spare"] = spare_cpu_sample(lab, a, load[1]["rate"])
                log("    spare CPU at 1: " + ", ".join(
                    f"{v['burned_pct']:.1f} % burned: p99 {v['p99_us'] / 1000:.2f} ms" for v in load["spare"].values()))
            # After the spare-CPU curve: removing the idle containers leaves the engine busy for a while.
            if i == 1 and a.projects > 1 and a.control_repeats:
                load["control"] = host_control_sample(lab, a, load[1]["rate"])
                c = load["control"]
                log(f"    host control with {c['containers']} idle containers: " + ", ".join(
                    f"{path} p99 {c['without'][path]['p99_us'] / 1000:.2f} -> {c['with'][path]['p99_us'] / 1000:.2f} ms"
                    for path in CONTROL_PATHS))
            r = load[i]
            log(f"    load at {i}: {r['rps']:,.0f} req/s, proxy CPU {r['cpu_us']:.1f} µs per request; "
                f"p99 {r['p99_us'] / 1000:.2f} ms ({min(r['p99_runs']) / 1000:.2f}–{max(r['p99_runs']) / 1000:.2f}) "
                f"at {r['rate']} req/s; all {r['requests']:,} requests 2xx; host rules " + ", ".join(f"{c} {v if isinstance(v, int) else '?'}" for c, v in rules[i].items()))
        if i == a.projects:
            fast_path_ab(lab, a, load)
    bad = []
    for i in range(1, a.projects + 1):
        check_stop()
        good, what = answers_as(lab.public, lab.host(i), lab.project(i))
        if not good:
            bad.append(f"{lab.host(i)}: {what}")
    if bad:
        raise Failed(f"{len(bad)} of {a.projects} hosts did not answer 200 from their project:\n  " + "\n  ".join(bad))
    log(f"all {a.projects} hosts answer 200 from their own project")
    check_stop()  # an interrupted run writes no results
    text = report(lab, a, deploys, idle, nets, load, rules, versions(lab, a), time.monotonic() - started)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    log(text)
    if a.out:
        log(f"scale: wrote {a.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--projects", type=int,
                    help="projects to deploy (default 200; 4 with --smoke); above 250 see Networks above")
    ap.add_argument("--smoke", action="store_true",
                    help="CI mode: few projects, short windows, writes no docs")
    ap.add_argument("--window", type=float, help="idle window in seconds (default 20; 3 with --smoke)")
    ap.add_argument("--settle", type=float, help="seconds between a deploy and its idle window (default 5; 1 with --smoke)")
    ap.add_argument("--load-seconds", type=float, help="seconds per load run (default 10; 2 with --smoke)")
    ap.add_argument("--repeats", type=int, help="load runs of each kind, median taken (default 3; 1 with --smoke)")
    ap.add_argument("--p99-repeats", type=int, help="fixed-rate runs per load sample, median p99 taken "
                    "(default 5; 1 with --smoke)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--burn-repeats", type=int,
                    help="rounds of the spare-CPU sample at 1 project: fixed-rate runs with 0, 5, 10, 15 and 20 %% of a "
                    "core taken by a synthetic background (default 5; 0 skips it; 0 with --smoke)")
    ap.add_argument("--control-repeats", type=int,
                    help="rounds of the host control at 1 project, without and then with N-1 idle containers: "
                    "luma-proxy and nginx each in a container, and both run natively (default 5; 1 with --smoke; "
                    "0 skips it)")
    ap.add_argument("--check-interval", help="every app's health_check.interval (e.g. 10s; default: luma's, 1s): "
                    "to see what the checks cost at N projects")
    ap.add_argument("--at", help="comma-separated project counts to sample at idle (default 1,50,N; 1,N with --smoke)")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"),
                    help="where luma, luma-loadgen, luma-demo-backend and luma-proxy (the host control's) are "
                    "(default target/release)")
    ap.add_argument("--image", default=os.environ.get("LUMA_DEMO_IMAGE", "luma-demo:dev"))
    ap.add_argument("--prefix", help="name prefix of every object (default lumascale<pid>); must be unique")
    ap.add_argument("--deploy-timeout", type=float, default=300)
    ap.add_argument("--no-fast-path", action="store_true",
                    help="run luma with LUMA_HOST_FAST_PATH=off (no DOCKER-USER rule; no comparison without it)")
    ap.add_argument("--out", help="results file (default docs/scale.md; none with --smoke)")
    a = ap.parse_args()
    smoke = a.smoke
    a.projects = a.projects or (4 if smoke else 200)
    a.window = a.window if a.window is not None else (3 if smoke else 20)
    a.settle = a.settle if a.settle is not None else (1 if smoke else 5)
    a.load_seconds = a.load_seconds or (2 if smoke else 10)
    a.repeats = a.repeats or (1 if smoke else 3)
    a.p99_repeats = a.p99_repeats or (1 if smoke else 5)
    a.burn_repeats = a.burn_repeats if a.burn_repeats is not None else (0 if smoke else 5)
    if a.burn_repeats < 0:
        ap.error("--burn-repeats must be 0 or more")
    a.control_repeats = a.control_repeats if a.control_repeats is not None else (1 if smoke else 5)
    if a.control_repeats < 0:
        ap.error("--control-repeats must be 0 or more")
    if a.out is None and not smoke:
        a.out = os.path.join(ROOT, "docs", "scale.md")
    if a.projects < 1:
        ap.error("--projects must be at least 1")
    # The clean-up removes everything whose name starts with `<prefix>-`: a short or common
    # word (`web`, `shop`) could be someone's project, so only long ones (and preflight checks
    # that nothing uses it yet).
    if a.prefix and not re.fullmatch(r"[a-z][a-z0-9]{5,20}", a.prefix):
        ap.error("--prefix: 6-21 lowercase letters and digits, starting with a letter, unused on the engine "
                 "(e.g. lumascale42)")
    try:
        a.net_env = network_env(a.projects)
    except ValueError as e:
        ap.error(str(e))
    at = {1, a.projects} | ({50} if not smoke else set())
    if a.at:
        try:
            at = {int(x) for x in a.at.split(",")} | {1, a.projects}
        except ValueError:
            ap.error("--at: comma-separated numbers, e.g. 1,50,200")
    at = {k for k in at if 1 <= k <= a.projects}
    a.luma = os.path.join(a.bin_dir, "luma")
    a.loadgen = os.path.join(a.bin_dir, "luma-loadgen")
    a.demo_backend = os.path.join(a.bin_dir, "luma-demo-backend")
    for b in (a.luma, a.loadgen, a.demo_backend):
        if not os.access(b, os.X_OK):
            sys.exit(f"scale: {b} is missing: build it (`cargo build --release -p luma-cli -p luma-benches "
                     "-p luma-demo-backend`, "
                     "or benches/scale.sh), or point --bin-dir at it")

    ok, why = check_peers(a)
    if not ok:
        sys.exit(f"scale: {why}")

    # Handlers first: from here on a signal is recorded, and acted on at the next safe point.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    lab = Lab(a)
    try:
        preflight(lab)
    except (Failed, Interrupted) as e:
        shutil.rmtree(lab.tmp, ignore_errors=True)
        log(f"scale: {e}", err=True)
        sys.exit(130 if isinstance(e, Interrupted) else 2)
    log(f"scale: {a.projects} projects, prefix {lab.prefix}, proxy {lab.proxy} on {lab.client.host_ip}:{lab.http}; "
        f"idle samples at {sorted(at)}; {fast_path_before(lab)}"
        + "".join(f"; {k}={v}" for k, v in a.net_env.items()))
    code = 1
    try:
        scale(lab, a, at)
        code = 0
    except (Failed, Interrupted) as e:
        log(f"scale: FAILED: {e}", err=True)
        code = 130 if isinstance(e, Interrupted) else 1
    except Exception:  # a bug in this script: report it, and clean up all the same
        log(f"scale: FAILED with an error in the harness:\n{traceback.format_exc()}", err=True)
    finally:
        # First thing: nothing acts on signals any more (the handler never raises, and `run`
        # no longer interrupts its child), so the clean-up cannot be cut short.
        STOP.cleaning = True
        fast = (f", and luma's fast-path rule for {lab.fast_path['pool']} in {USER_CHAIN} if this run's luma "
                "added it" if lab.fast_path["before"] is False else "")
        log(f"scale: removing this run's objects ({lab.prefix}-*, luma-lock_{lab.prefix}-*, "
            f"{LABEL_PROJECT}={lab.prefix}-p*){fast}")
        left, errors = lab.sweep()
        for e in errors:
            log(f"scale: clean-up error: {e}", err=True)
        if left:
            log(f"scale: FAILED to remove: {left}", err=True)
            code = code or 1
        else:
            log(f"scale: nothing of {lab.prefix} is left")
        # Python restores the default handlers while exiting: a signal then would kill it and
        # replace the exit code, so the last ones are ignored.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    main()
