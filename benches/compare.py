#!/usr/bin/env python3
"""Throughput and latency of luma-proxy side by side with nginx, HAProxy and Caddy.

Every contender proxies to the same 1 KiB keep-alive backend on 127.0.0.1, with the same worker
count, no access logs and the same forwarded headers (peers/ holds each config with its reasons).
For each worker count (1 and 2), with every contender started once and measured in rounds
(one run each per round, the order shuffled; see in_rounds), so that a shared VM's drift moves
all of them alike and each round gives a paired ratio to nginx:
  * saturation: wrk, 64 keep-alive connections;
  * fixed rate: luma-loadgen at half of nginx's saturation rate, for p50/p99/p99.9;
  * CPU-seconds per 1,000 requests (from /proc, all of a contender's processes) and peak RSS;
  * luma-proxy against the speed goals of issue 11 (goals()).
A "direct" run (no proxy) gives the ceiling. Nothing is asserted: the numbers are reported.
  * HTTP/2 cleartext (h2c, prior knowledge): h2load, 16 connections x 4 streams (64 in flight,
    like wrk), against luma-proxy (its HTTP listener takes h2c and HTTP/1.1 alike), nginx
    (`listen ... http2` on a second port) and HAProxy (`bind ... proto h2`), same backend over
    HTTP/1.1.

HTTPS (issue 9): luma-proxy, nginx and HAProxy terminate TLS with the same ECDSA P-256
certificate for bench.test, made once per run with openssl (TlsKit), in front of the same
backend, with the same worker counts and the TLS settings of peers/*-tls.* (reasons there). The
clients pin TLS 1.3 with TLS_AES_128_GCM_SHA256 and X25519, so every contender negotiates the
same, and reach bench.test on 127.0.0.1 with SNI bench.test. Per worker count:
  * keep-alive HTTPS: wrk over https, 64 connections;
  * new TLS handshakes: wrk with "Connection: close", every handshake full (tls/no_resume.c stops
    wrk's session resumption; checked against nginx's $ssl_session_reused before the runs);
  * HTTP/2 over TLS: h2load, 16 connections x 4 streams (64 in flight, like wrk).
Before measuring, each contender is probed (tls_probe): 200 over h2 and HTTP/1.1 with the run's
CA, X-Forwarded-Proto https, the same leaf, and what it negotiated; a contender that fails the
probe stops the run (a harness error), a slow one never does. Only numbers are reported.

With --only, the other part's section of an existing --out file is kept as it was.

Usage: benches/compare.py [--smoke] [--only http|tls] [--out docs/benchmarks.md]
"""
import argparse
import json
import os
import platform
import random
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
PORTS = {"luma-proxy": 18101, "nginx": 18102, "haproxy": 18103, "caddy": 18104, "luma-base": 18105}
TLS_PORTS = {"luma-proxy": 18111, "nginx": 18112, "haproxy": 18113}
# h2c with prior knowledge: luma-proxy serves it on its HTTP listener; nginx 1.22 and HAProxy need
# a listener of their own for it.
H2C_PORTS = {"luma-proxy": PORTS["luma-proxy"], "nginx": 18122, "haproxy": 18123, "luma-base": PORTS["luma-base"]}
H2C_NAMES = ["luma-base", "luma-proxy", "nginx", "haproxy"]
ADMIN = 18191
# `--baseline BINARY`: another luma-proxy build (an earlier commit's) run as contender "luma-base"
# beside the current one, so a change is measured before and after in one run. HTTP only.
BASELINE = None
CLK = os.sysconf("SC_CLK_TCK")
# The TLS contenders: the three the issue compares. Caddy is left out of HTTPS: it is at half of
# nginx's rate already over plain HTTP, and every contender adds minutes to the run.
TLS_NAMES = ["luma-proxy", "nginx", "haproxy"]
TLS_HOST = "bench.test"  # .test: reserved, never a public name
# What the clients offer, one choice each, so that all contenders negotiate the same: the
# suite and group browsers use first.
TLS13_SUITE = "TLS_AES_128_GCM_SHA256"
TLS_GROUP = "X25519"
H2_CONNECTIONS, H2_STREAMS = 16, 4
TLS_METRICS = ("keepalive", "handshake", "h2")


def render(template_path, values):
    """The config at `template_path` (from the repository's root), filled (`fill`)."""
    with open(os.path.join(ROOT, template_path)) as f:
        return fill(f.read(), values)


def fill(text, values):
    """Fills {name} placeholders; the configs' own braces stay as they are."""
    for k, v in values.items():
        text = text.replace("{" + k + "}", str(v))
    return text


def wait_port(port, timeout=10.0, proc=None):
    """Waits until 127.0.0.1:port accepts; `proc` exiting first is an error at once."""
    import socket
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening on 127.0.0.1:{port}")
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


def status_kib(pids, field):
    """A /proc/PID/status memory field (VmRSS, VmHWM) in KiB, summed over `pids`; a process that
    is gone counts 0."""
    kib = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                m = re.search(rf"{field}:\s+(\d+)", f.read())
            kib += int(m.group(1)) if m else 0
        except OSError:
            pass
    return kib


def peak_rss_mib(pids):
    return status_kib(pids, "VmHWM") / 1024


class Contender:
    """One proxy under test. With `tls` (a TlsKit) it terminates HTTPS on TLS_PORTS[name]."""

    def __init__(self, name, workers, tmp, tls=None, handshake_log=None):
        self.name, self.workers, self.tmp, self.proc = name, workers, tmp, None
        self.tls, self.handshake_log = tls, handshake_log
        self.port = TLS_PORTS[name] if tls else PORTS.get(name, BACKEND)

    def start(self):
        n, tmp, port, kit = self.workers, self.tmp, self.port, self.tls
        fmt = dict(workers=n, tmp=tmp, port=port, h2_port=H2C_PORTS.get(self.name, 0), backend_port=BACKEND)
        if kit:
            fmt.update(cert=kit.cert, key=kit.key, crt=kit.combined,
                       access_log=f"{self.handshake_log} handshake" if self.handshake_log else "off")
        env = dict(os.environ)
        if self.name in ("luma-proxy", "luma-base"):
            binary, admin = self.luma()
            state = os.path.join(tmp, "luma-state")
            cmd = [binary, "serve", "--http", f"127.0.0.1:{PORTS[self.name]}", "--admin", f"127.0.0.1:{admin}",
                   "--state-dir", state, "--no-access-log", "--workers", str(n),
                   # The bench backend is a loopback ip:port, not an alias in a project network.
                   "--allow-literal-targets"]
            if self.name == "luma-base":
                cmd += ["--https", "127.0.0.1:0", "--acme-directory", "off"]
            elif luma_has_https():
                # Always on loopback (the default is 0.0.0.0:8443), also in the HTTP runs, where it
                # stays idle. Bench routes have custom certificates or none: no CA is ever asked.
                cmd += ["--https", f"127.0.0.1:{TLS_PORTS['luma-proxy']}"]
                if "--acme-directory" in luma_serve_help():
                    cmd += ["--acme-directory", "off"]
            # No peer has a metrics listener; luma-proxy's default one looks at the host's
            # interfaces every 2 s on a thread of its own, work no peer does.
            if "--metrics" in luma_serve_help(binary):
                cmd += ["--metrics", "off"]
        elif self.name == "nginx":
            os.makedirs(os.path.join(tmp, "body"), exist_ok=True)
            conf = os.path.join(tmp, "nginx.conf")
            open(conf, "w").write(render("benches/peers/nginx-tls.conf.in" if kit else "benches/peers/nginx.conf.in", fmt))
            cmd = ["nginx", "-p", tmp, "-c", conf, "-g", "daemon off;"]
        elif self.name == "haproxy":
            conf = os.path.join(tmp, "haproxy.cfg")
            open(conf, "w").write(render("benches/peers/haproxy-tls.cfg.in" if kit else "benches/peers/haproxy.cfg.in", fmt))
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
        try:
            wait_port(port, proc=self.proc)
            if self.name == "luma-proxy" and kit:
                luma_deploy_tls(state, kit)
            elif self.name in ("luma-proxy", "luma-base"):
                subprocess.run([binary, "deploy", "--admin", f"127.0.0.1:{admin}", "--state-dir", state,
                                "--host", "127.0.0.1", "--project", "bench", "--target", f"127.0.0.1:{BACKEND}"],
                               check=True, stdout=subprocess.DEVNULL, timeout=60)
        except (RuntimeError, subprocess.SubprocessError) as e:
            self.stop()  # never leave a half-started contender holding the ports
            raise RuntimeError(f"{self.name} ({' '.join(cmd[:2])}): {e}\n{self.log_tail()}") from e

    def luma(self):
        """(binary, admin port) of a luma-proxy contender."""
        if self.name == "luma-base":
            return BASELINE, ADMIN + 1
        return f"{REL}/luma-proxy", ADMIN

    def log_tail(self):
        try:
            with open(os.path.join(self.tmp, f"{self.name}.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

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


def luma_serve_help(binary=None):
    """`luma-proxy serve --help` of `binary` (default: this build): which flags it has (HTTPS
    arrives with issue 9, the metrics listener after it)."""
    binary = binary or f"{REL}/luma-proxy"
    if binary not in _LUMA_HELP:
        r = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True)
        _LUMA_HELP[binary] = r.stdout + r.stderr
    return _LUMA_HELP[binary]


_LUMA_HELP = {}


def luma_has_https():
    return "--https" in luma_serve_help()


def luma_deploy_tls(state, kit):
    """Deploys bench.test with the run's certificate as a custom certificate, the way `luma`
    does it: one `luma_api::Request` on stdin of `luma-proxy call` (the key never in argv)."""
    route = {"project": "bench", "hosts": [TLS_HOST], "target": f"127.0.0.1:{BACKEND}",
             "tls": {"certificate": {"custom": {"sha256": kit.sha256}}, "redirect": False, "hsts": False}}
    req = {"deploy": {"route": route, "certificate": {"chain_pem": kit.cert_pem, "key_pem": kit.key_pem},
                      "deploy_timeout_ms": 30_000}}
    r = subprocess.run([f"{REL}/luma-proxy", "call", "--admin", f"127.0.0.1:{ADMIN}", "--state-dir", state],
                       input=json.dumps(req), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"luma-proxy refused the HTTPS route for {TLS_HOST}: {(r.stdout or r.stderr).strip()[:500]}")


class TlsKit:
    """The run's certificate and the clients' TLS files, made once per run in `tmp`.

    One ECDSA P-256 CA and one ECDSA P-256 leaf for bench.test signed by it (2 days). Every
    contender serves the leaf alone, so the same bytes go on the wire; clients that verify
    (curl, openssl s_client) trust the CA. wrk and h2load do not verify certificates at all.
    """

    def __init__(self, tmp):
        d = os.path.join(tmp, "tls")
        os.makedirs(d, mode=0o700)
        self.ca, self.cert, self.key, self.combined = (os.path.join(d, f) for f in ("ca.pem", "leaf.pem", "leaf.key", "leaf+key.pem"))
        ca_key, csr, ext = (os.path.join(d, f) for f in ("ca.key", "leaf.csr", "leaf.ext"))
        with open(ext, "w") as f:
            f.write(f"subjectAltName=DNS:{TLS_HOST}\nbasicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
        p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        for cmd in (["openssl", "req", "-x509", *p256, "-keyout", ca_key, "-out", self.ca, "-days", "2",
                     "-subj", "/CN=luma bench CA"],
                    ["openssl", "req", "-new", *p256, "-keyout", self.key, "-out", csr, "-subj", f"/CN={TLS_HOST}"],
                    ["openssl", "x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", ca_key, "-CAcreateserial",
                     "-days", "2", "-sha256", "-extfile", ext, "-out", self.cert]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:3])}: {r.stderr.strip()[:500]}")
        self.cert_pem, self.key_pem = open(self.cert).read(), open(self.key).read()
        with open(self.combined, "w") as f:
            f.write(self.cert_pem + self.key_pem)
        self.sha256 = pem_sha256(self.cert_pem)
        # wrk takes no TLS options: OpenSSL's config file pins its suite and group instead.
        self.client_conf = os.path.join(d, "client-openssl.cnf")
        with open(self.client_conf, "w") as f:
            f.write("openssl_conf = conf\n[conf]\nssl_conf = ssl\n[ssl]\nsystem_default = client\n"
                    f"[client]\nMinProtocol = TLSv1.3\nCiphersuites = {TLS13_SUITE}\nGroups = {TLS_GROUP}\n")
        self.resolve_lua = os.path.join(ROOT, "benches", "tls", "resolve.lua")
        self.no_resume = os.path.join(d, "no_resume.so")
        cc = shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise RuntimeError("no C compiler (cc): needed to build benches/tls/no_resume.c for the handshake runs")
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", self.no_resume,
                        os.path.join(ROOT, "benches", "tls", "no_resume.c"), "-ldl"], check=True)


def pem_sha256(pem):
    """SHA-256 (hex) of the first certificate's DER in a PEM text: the name a custom
    certificate goes by in `RouteTls`."""
    import base64
    import hashlib
    m = re.search(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", pem, re.S)
    if not m:
        raise RuntimeError("no certificate in PEM")
    return hashlib.sha256(base64.b64decode("".join(m.group(1).split()))).hexdigest()


def wrk(port, seconds, kit=None, close=False):
    """wrk saturation: (req/s, requests, errors). With `kit`: https://bench.test on 127.0.0.1;
    `close`: "Connection: close", one full handshake per request (no_resume.so)."""
    if kit is None:
        cmd, env = ["wrk", "-t2", "-c64", f"-d{seconds}s", f"http://127.0.0.1:{port}/"], None
    else:
        cmd = ["wrk", "-t2", "-c64", f"-d{seconds}s", "-s", kit.resolve_lua, f"https://{TLS_HOST}:{port}/"]
        env = dict(os.environ, OPENSSL_CONF=kit.client_conf)
        if close:
            cmd[1:1] = ["-H", "Connection: close"]
            env["LD_PRELOAD"] = kit.no_resume
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return rps, reqs, errors + non2xx


# What h2load reports as its application protocol, longest first so that a name is never taken
# for the start of a longer one.
H2LOAD_PROTOCOLS = ("http/1.1", "h2c", "h2")


def spoke(out, proto):
    """True if h2load reports `proto` as its application protocol. Its threads print at once, so
    other threads' text can land inside that line, before the name ("Application protocol:
    Warm-up phase is over for thread #h2c") or glued to its end ("for thread #Application
    protocol: h2c1."): the first protocol name after the label is the one it spoke."""
    after = out.split("Application protocol:", 1)
    if len(after) != 2:
        return False
    m = re.search("|".join(re.escape(p) for p in H2LOAD_PROTOCOLS), after[1][:300])
    return bool(m) and m.group(0) == proto


def h2load_result(out, port, proto):
    """(req/s, requests, errors) from h2load's output; fails unless it spoke `proto`."""
    m = re.search(r"finished in [^,]+, ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    if not m or not counts or not spoke(out, proto):
        raise RuntimeError(f"h2load against port {port} did not run over {proto}:\n{out[-1500:]}")
    succeeded, failed, errored, timeout = (int(counts.group(i)) for i in (4, 5, 6, 7))
    status_errors = sum(int(x) for x in re.findall(r"(\d+) [45]xx", out))
    return float(m.group(1)), succeeded, failed + errored + timeout + status_errors


def h2load(port, seconds, kit):
    """h2load over TLS with ALPN h2: (req/s, requests, errors)."""
    threads = 2
    out = subprocess.run(["h2load", "-t", str(threads), "-c", str(H2_CONNECTIONS), "-m", str(H2_STREAMS), "-D", str(seconds),
                          f"--tls13-ciphers={TLS13_SUITE}", f"--groups={TLS_GROUP}", "--npn-list=h2",
                          f"--connect-to=127.0.0.1:{port}", f"https://{TLS_HOST}:{port}/"],
                         capture_output=True, text=True, check=True).stdout
    return h2load_result(out, port, "h2")


def h2c(port, seconds):
    """h2load over cleartext HTTP/2 with prior knowledge: (req/s, requests, errors)."""
    out = subprocess.run(["h2load", "-t", "2", "-c", str(H2_CONNECTIONS), "-m", str(H2_STREAMS), "-D", str(seconds),
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    return h2load_result(out, port, "h2c")


def tls_probe(port, kit):
    """What a contender does over TLS, checked with clients that verify against the run's CA.
    Raises if it does not answer 200 over h2 and HTTP/1.1, does not send X-Forwarded-Proto
    https, or serves another certificate than the run's leaf."""
    def curl(version, path):
        r = subprocess.run(["curl", "-sS", version, "--max-time", "5", "--cacert", kit.ca,
                            "--resolve", f"{TLS_HOST}:{port}:127.0.0.1", "-w", "\n%{http_version} %{http_code}",
                            f"https://{TLS_HOST}:{port}{path}"], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"curl {version} https://{TLS_HOST}:{port}{path}: {r.stderr.strip()}")
        body, _, status = r.stdout.rpartition("\n")
        return body, status

    for version, want in (("--http2", "2 200"), ("--http1.1", "1.1 200")):
        _, status = curl(version, "/")
        if status != want:
            raise RuntimeError(f"{TLS_HOST}:{port} {version}: got '{status}', want '{want}' (HTTP version, status)")
    headers, _ = curl("--http2", "/_demo/headers")
    if not re.search(r"^x-forwarded-proto:\s*https\s*$", headers, re.I | re.M):
        raise RuntimeError(f"{TLS_HOST}:{port} did not send X-Forwarded-Proto: https to the backend:\n{headers[:800]}")

    sess = os.path.join(os.path.dirname(kit.cert), f"session-{port}.pem")
    def s_client(extra):
        req = f"GET / HTTP/1.1\r\nHost: {TLS_HOST}\r\nConnection: close\r\n\r\n"
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", TLS_HOST,
                            "-verify_hostname", TLS_HOST, "-CAfile", kit.ca, "-verify_return_error", "-alpn", "http/1.1",
                            "-groups", TLS_GROUP, "-ciphersuites", TLS13_SUITE, "-ign_eof", *extra],
                           input=req, capture_output=True, text=True, timeout=15)
        return r.stdout + r.stderr
    first = s_client(["-sess_out", sess])
    again = s_client(["-sess_in", sess])
    session = re.search(r"^(New|Reused), (TLSv[\d.]+), Cipher is (\S+)", first, re.M)
    group = re.search(r"(?:Server Temp Key|Negotiated TLS1.3 group): (\w+)", first)
    leaf = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", first, re.S)
    if not session or "Verify return code: 0 (ok)" not in first or not leaf:
        raise RuntimeError(f"openssl s_client against {TLS_HOST}:{port} failed:\n{first[-1500:]}")
    if pem_sha256(leaf.group(0)) != kit.sha256:
        raise RuntimeError(f"{TLS_HOST}:{port} served another certificate than the run's leaf")
    return {"protocol": session.group(2), "cipher": session.group(3), "group": group.group(1) if group else "?",
            "tickets": first.count("Post-Handshake New Session Ticket arrived"),
            "resumes": bool(re.search(r"^Reused, ", again, re.M))}


def tls_probe_until(c, kit, deadline_s=15.0):
    """tls_probe, retried until the contender is ready (luma-proxy loads the certificate the
    deploy sent) or the deadline passes; the last error is raised."""
    end = time.time() + deadline_s
    while True:
        try:
            return tls_probe(c.port, kit)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            if time.time() > end:
                raise RuntimeError(f"{c.name} ({c.workers} workers) over TLS: {e}\n{c.name} log:\n{c.log_tail()}") from e
            time.sleep(0.2)


def check_full_handshakes(kit, tmp):
    """Shows what the handshake runs measure: wrk with "Connection: close" against nginx,
    whose log says per request whether the handshake was resumed. Without no_resume.so wrk
    resumes; with it every handshake must be full, or the run stops."""
    log = os.path.join(tmp, "handshakes.log")
    c = Contender("nginx", 1, tempfile.mkdtemp(dir=tmp), tls=kit, handshake_log=log)
    c.start()
    counts = {}
    try:
        for shim in (False, True):
            open(log, "w").close()
            env = dict(os.environ, OPENSSL_CONF=kit.client_conf, **({"LD_PRELOAD": kit.no_resume} if shim else {}))
            subprocess.run(["wrk", "-t1", "-c4", "-d1s", "-H", "Connection: close", "-s", kit.resolve_lua,
                            f"https://{TLS_HOST}:{c.port}/"], capture_output=True, text=True, check=True, env=env)
            lines = [l.split() for l in open(log).read().splitlines() if l.strip()]
            counts[shim] = {"requests": len(lines), "resumed": sum(1 for l in lines if l[0] == "r"),
                            "negotiated": sorted({" ".join(l[1:]) for l in lines})}
    finally:
        c.stop()
    if counts[True]["requests"] == 0 or counts[True]["resumed"] != 0:
        raise RuntimeError(f"no_resume.so did not stop wrk resuming TLS sessions: {counts[True]}")
    return {"without": counts[False], "with": counts[True]}


# Each fixed-rate run first sends the same load for this long, not counted (its failures are):
# the steady state is measured, not the run's first milliseconds, in which a contender whose idle
# upstream connections expired while the others ran opens them all at once (luma-proxy keeps
# them 1.5 s by default, nginx 60 s: without it, 12-41 % of luma-proxy's requests slower than
# its p99 fell in the first 200 ms of a 5 s run after 3 s idle, against 8-22 % of nginx's).
FIXED_WARMUP_S = 1


def loadgen(port, rate, seconds, records=None):
    """One fixed-rate run: luma-loadgen's summary, with the CPU time the hypervisor took from
    this VM during it (`steal_ms`) and the load generator's own CPU, warm-up included, in all
    (`loadgen_cpu_s`) and per request sent (`loadgen_cpu_us`: it shares the machine with the
    contenders). `records`: also
    write each request's due time (Unix µs) and latency to that file (`host_tail.py`)."""
    before = steal_ticks()
    extra = ["--records", records, "--records-us"] if records else []
    cmd = [f"{REL}/luma-loadgen", "--addr", f"127.0.0.1:{port}", "--host", "127.0.0.1",
           "--connections", "64", "--rate", str(rate), "--duration", str(seconds),
           "--warmup", str(FIXED_WARMUP_S)] + extra
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = p.stdout.read()
        # This child's own rusage (wait4), not RUSAGE_CHILDREN's sum over whatever was reaped.
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stdout.close()
        if p.returncode != 0:
            err.seek(0)
            raise subprocess.CalledProcessError(p.returncode, cmd, out, err.read().decode(errors="replace"))
    r = json.loads(out)
    cpu_s = usage.ru_utime + usage.ru_stime
    return dict(r, steal_ms=(steal_ticks() - before) * 1000 / CLK, loadgen_cpu_s=cpu_s,
                loadgen_cpu_us=cpu_s * 1e6 / max(r["sent"] + r["warmup_s"] * rate, 1))


def steal_ticks():
    """`/proc/stat`'s steal, all CPUs, in clock ticks: time the hypervisor ran something else
    while this VM's CPUs had work to do, a stall no process here can see or avoid. On a shared
    VM it falls on a round here and there, and a round it falls on can have twice the p99."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


def version(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "not installed"


def measure(pids, repeats, run):
    """`repeats` runs of one contender in a row (the HTTPS rows): `summary` of them."""
    return summary([sample(pids, run) for _ in range(repeats)])


def sample(pids, run):
    """One run: `run()` -> (rate, requests, errors); with the CPU-seconds per 1,000 requests of
    `pids` during it."""
    before = cpu_seconds(pids)
    rate, reqs, errs = run()
    return {"rps": rate, "errors": errs, "cpu_per_1k": (cpu_seconds(pids) - before) / max(reqs, 1) * 1000}


def in_rounds(names, repeats, run):
    """`run(name)` for every name, `repeats` rounds: {name: [result of each round]}. The
    contenders of a round run back to back, so a machine that drifts (a shared VM) moves them
    alike, and each round gives a paired ratio. The order is shuffled each round (seeded, so a
    rerun uses the same orders), so no contender always runs first, or always right after the
    same other one (whatever a run leaves behind, such as TIME_WAIT sockets, lands on a
    different contender each time)."""
    out = {name: [] for name in names}
    for r in range(repeats):
        for name in random.Random(r).sample(names, len(names)):
            out[name].append(run(name))
    return out


def summary(runs):
    """Medians of a contender's rounds, the per-round values kept for the paired ratios."""
    return {"rps": statistics.median(x["rps"] for x in runs), "errors": sum(x["errors"] for x in runs),
            "cpu_per_1k": statistics.median(x["cpu_per_1k"] for x in runs), "rounds": runs}


def run_http(worker_counts, names, seconds, repeats, tmp, backend):
    """Per worker count, every contender is started once and they run in rounds (`in_rounds`):
    saturation, then the fixed rate, then h2c. Only the one being measured gets load."""
    results = {}
    for n in worker_counts:
        cs = {name: Contender(name, n, tempfile.mkdtemp(dir=tmp)) for name in names}
        try:
            for c in cs.values():
                c.start()
            for c in cs.values():
                wrk(c.port, 1)  # warm-up: pools filled, caches hot
            pids = {name: c.pids() if name != "direct" else tree_pids(backend.pid) for name, c in cs.items()}
            sat = in_rounds(names, repeats, lambda name: sample(pids[name], lambda: wrk(cs[name].port, seconds)))
            for name in names:
                results[(n, name)] = summary(sat[name])
                print(f"workers={n} {name}: {results[(n, name)]['rps']:.0f} req/s", file=sys.stderr)
            rate = int(results[(n, "nginx")]["rps"] / 2)
            fixed = in_rounds(names, repeats, lambda name: loadgen(cs[name].port, rate, seconds))
            for name in names:
                r = results[(n, name)]
                r["rate"] = rate
                for k in ("p50_us", "p99_us", "p999_us"):
                    r[k] = statistics.median(f[k] for f in fixed[name])
                r["p99_rounds"] = [f["p99_us"] for f in fixed[name]]
                r["hist_rounds"] = [f["hist"] for f in fixed[name]]
                r["steal_rounds"] = [f["steal_ms"] for f in fixed[name]]
                r["send_late_rounds"] = [(f["send_late_p50_us"], f["send_late_p99_us"]) for f in fixed[name]]
                r["loadgen_cpu_rounds"] = [f["loadgen_cpu_us"] for f in fixed[name]]
                r["fixed_failed"] = sum(f["non_2xx"] + f["socket_errors"] + f["timeouts"] + f.get("warmup_failed", 0)
                                        for f in fixed[name])
            # Peak RSS over the HTTP/1.1 runs, before h2c adds its own.
            for name in names:
                results[(n, name)]["rss"] = peak_rss_mib(pids[name]) if name != "direct" else None
            h2 = [x for x in H2C_NAMES if x in names]
            for name in h2:
                h2c(H2C_PORTS[name], 1)  # warm-up
            runs = in_rounds(h2, repeats, lambda name: sample(pids[name], lambda: h2c(H2C_PORTS[name], seconds)))
            for name in h2:
                results[(n, name, "h2c")] = summary(runs[name])
                print(f"workers={n} {name} h2c: {results[(n, name, 'h2c')]['rps']:.0f} req/s", file=sys.stderr)
            for name in h2:
                results[(n, name, "h2c")]["rss"] = peak_rss_mib(pids[name])  # both protocols
        finally:
            for c in cs.values():
                c.stop()
    return results


def paired(mine, theirs):
    """Per-round ratios mine/theirs: (median, lowest, highest)."""
    ratios = [a / b for a, b in zip(mine, theirs) if b]
    return (statistics.median(ratios), min(ratios), max(ratios)) if ratios else (float("nan"),) * 3


def pooled_pct(hists, p):
    """The p-th percentile of all the requests of several runs, from their histograms
    (luma-loadgen's `hist`: [[bucket floor in µs, count], ...], buckets at most 1.6 % wide): the
    middle of the bucket holding it (within 0.8 % of the value), ranked much as luma-loadgen
    ranks one run's."""
    counts = {}
    for h in hists:
        for floor, n in h:
            counts[floor] = counts.get(floor, 0) + n
    total = sum(counts.values())
    if not total:
        return float("nan")
    rank, seen = round(p / 100 * (total - 1)), 0
    for floor in sorted(counts):
        seen += counts[floor]
        if seen > rank:
            # luma-loadgen's buckets: exact below 128 µs, then 64 per power of two.
            width = 1 if floor < 128 else 1 << (floor.bit_length() - 7)
            return floor + (width - 1) / 2
    return float("nan")


def pooled_ratio(mine, theirs, p=99, resamples=1000):
    """mine/theirs of the p-th percentile over all the rounds' requests, with a 95 % interval:
    (ratio, low, high). A round's p99 swings with the few stalls of the machine that fall in its
    10 s, so the median of five per-round ratios moves by tenths from run to run; one percentile
    over all the rounds' requests takes in every stall. The interval resamples whole rounds, in
    pairs (a round of mine with the same round of theirs, which ran minutes apart at most), with
    replacement, seeded: it says how far another set of rounds like these could move the ratio.
    With 5 rounds there are only 126 distinct resamples and such an interval tends to be too
    narrow: a rough bound, not a test."""
    if not mine or len(mine) != len(theirs):
        return (float("nan"),) * 3
    ratio = pooled_pct(mine, p) / pooled_pct(theirs, p)
    rng, n, draws = random.Random(0), len(mine), []
    for _ in range(resamples if n > 1 else 0):
        pick = [rng.randrange(n) for _ in range(n)]
        draws.append(pooled_pct([mine[i] for i in pick], p) / pooled_pct([theirs[i] for i in pick], p))
    draws.sort()
    if not draws:
        return ratio, ratio, ratio
    return ratio, draws[round(0.025 * (len(draws) - 1))], draws[round(0.975 * (len(draws) - 1))]


def pooled_cell(mine, theirs):
    m, lo, hi = pooled_ratio(mine, theirs)
    return f"{m:.2f} ({lo:.2f}–{hi:.2f})" if len(mine) > 1 else f"{m:.2f}"


def ratio_cell(mine, theirs):
    m, lo, hi = paired(mine, theirs)
    return f"{m:.2f} ({lo:.2f}–{hi:.2f})" if len(mine) > 1 else f"{m:.2f}"


def run_tls(worker_counts, tls_names, seconds, repeats, tmp, kit):
    """The HTTPS rows. A contender that cannot serve HTTPS here (a luma-proxy built before
    issue 9) is reported as skipped, with the reason; every other failure stops the run."""
    results, probes, skipped = {}, {}, {}
    if "luma-proxy" in tls_names and not luma_has_https():
        skipped["luma-proxy"] = "this luma-proxy build has no --https listener"
    for n in worker_counts:
        for name in tls_names:
            if name in skipped:
                continue
            c = Contender(name, n, tempfile.mkdtemp(dir=tmp), tls=kit)
            c.start()
            try:
                probes[(n, name)] = tls_probe_until(c, kit)
                wrk(c.port, 1, kit)  # warm-up: pools filled, caches hot
                pids = c.pids()
                r = {"keepalive": measure(pids, repeats, lambda: wrk(c.port, seconds, kit)),
                     "handshake": measure(pids, repeats, lambda: wrk(c.port, seconds, kit, close=True)),
                     "h2": measure(pids, repeats, lambda: h2load(c.port, seconds, kit))}
                r["rss"] = peak_rss_mib(pids)
                results[(n, name)] = r
            finally:
                c.stop()
            print(f"workers={n} {name} TLS: " + ", ".join(f"{m} {r[m]['rps']:.0f}/s" for m in TLS_METRICS), file=sys.stderr)
    return results, probes, skipped


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="1 s runs, 1 repeat, 1 worker: checks the harness, not speed")
    ap.add_argument("--only", choices=["http", "tls"], help="run one part; the report then has only that part")
    ap.add_argument("--contenders", help="comma-separated subset to run (nginx is always kept: the ratios are to it)")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", help="comma-separated worker counts to run (default 1,2): for a quicker "
                    "look at one; a record runs both, and the report says when it has fewer")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--baseline", metavar="BINARY", help="also run this luma-proxy build, as 'luma-base' (HTTP only)")
    ap.add_argument("--raw", metavar="FILE", help="also write the HTTP results as JSON (every round, with histograms)")
    a = ap.parse_args()
    # A SIGTERM or a closed terminal ends the run through the `finally` blocks, which stop every
    # contender and the backend; the default action would leave them running and listening.
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    global BASELINE
    BASELINE = os.path.abspath(a.baseline) if a.baseline else None
    seconds, repeats, worker_counts = (1, 1, [1]) if a.smoke else (a.seconds, a.repeats, [1, 2])
    if a.workers is not None:
        if a.smoke:
            ap.error("--smoke runs 1 worker; leave out --workers")
        try:
            worker_counts = [int(w) for w in a.workers.split(",")]
        except ValueError:
            ap.error(f"--workers takes worker counts such as 1,2, not {a.workers!r}")
        if min(worker_counts) < 1 or len(set(worker_counts)) != len(worker_counts):
            ap.error(f"--workers: each count once, each 1 or more, not {a.workers!r}")
    names = (["direct"] + (["luma-base"] if BASELINE else []) + ["luma-proxy", "nginx", "haproxy"]
             + (["caddy"] if shutil.which("caddy") else []))
    tls_names = list(TLS_NAMES)
    if a.contenders:
        keep = set(a.contenders.split(",")) | {"nginx"} | ({"direct"} if a.only != "tls" else set())
        unknown = keep - set(names) - set(TLS_NAMES)
        if unknown:
            ap.error(f"unknown contenders: {', '.join(sorted(unknown))}")
        names, tls_names = [n for n in names if n in keep], [n for n in tls_names if n in keep]
    tmp = tempfile.mkdtemp(prefix="luma-bench-")
    backend = subprocess.Popen([f"{REL}/luma-demo-backend"], env=dict(os.environ, PORT=str(BACKEND), BIND="127.0.0.1", DEMO_BODY_BYTES="1024"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    http = tls = None
    started = time.time()
    try:
        wait_port(BACKEND)
        if a.only != "tls":
            http = run_http(worker_counts, names, seconds, repeats, tmp, backend)
        if a.only != "http":
            kit = TlsKit(tmp)
            resumption = check_full_handshakes(kit, tmp)
            tls = run_tls(worker_counts, tls_names, seconds, repeats, tmp, kit) + (resumption, tls_names)
    finally:
        backend.terminate()
        backend.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"compare.py: {time.time() - started:.0f} s", file=sys.stderr)
    if a.raw and http:
        with open(a.raw, "w") as f:
            json.dump([{"key": list(k), "result": v} for k, v in http.items()], f)
    write(a, http, tls, worker_counts, names, seconds, repeats)


def write(a, http, tls, worker_counts, names, seconds, repeats):
    cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
    lines = [
        "# luma-proxy benchmarks",
        "",
        "Generated by `benches/compare.py`" + (" in smoke mode (numbers are not meaningful)" if a.smoke else "")
        + (f" (`--only {a.only}`; the {'HTTPS' if a.only == 'http' else 'HTTP'} section is from an earlier run)" if a.only else "")
        + (f" (`--workers {a.workers}`: only {', '.join(map(str, worker_counts))} of the usual 1 and 2 workers)"
           if worker_counts != [1, 2] and not a.smoke else "")
        + f" on {time.strftime('%Y-%m-%d')}.",
        "",
        f"- Machine: {os.cpu_count()} cores ({cpu.group(1) if cpu else platform.processor()}), {platform.system()} {platform.release()}",
        f"- Versions: luma-proxy {version([f'{REL}/luma-proxy', '--version']).split()[-1]}; {version(['nginx', '-v'])}; "
        f"{version(['haproxy', '-v'])}; caddy {version(['caddy', 'version'])}; {version(['wrk', '-v'])}; "
        f"{version(['h2load', '--version'])}; {version(['openssl', 'version'])}",
        f"- Backend: luma-demo-backend on 127.0.0.1:{BACKEND}, 1 KiB body, keep-alive (HTTP/1.1). Every contender: access logs off, "
        "X-Forwarded-For/-Proto/-Host and X-Request-Id added, upstream keep-alive pool. Configs with reasons: `benches/peers/`.",
        "- CPU: user+system seconds of all the contender's processes per 1,000 requests in the saturation runs "
        "(the load generator shares the 2 cores, so absolute numbers are lower than on a dedicated client). RSS: peak (VmHWM), summed over processes.",
    ]
    if BASELINE:
        lines.append(f"- luma-base: `{version([BASELINE, '--version'])}` from `{BASELINE}`, an earlier build run beside luma-proxy "
                     "(`--baseline`), so the two are compared in one run.")
    lines += [
        "",
    ]
    if http:
        lines += write_http(http, worker_counts, names, seconds, repeats)
    if tls:
        lines += write_tls(*tls, worker_counts, seconds, repeats)
    lines += scale_section(os.path.join(ROOT, "docs", "scale.md"))
    lines += ["Reproduce: `benches/run.sh` (installs the peers from Debian, builds release binaries, runs this); "
              "`benches/run.sh --only tls` runs the HTTPS part alone.", ""]
    if a.only:
        lines = keep_other_part(a.out, a.only, lines)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    open(a.out, "w").write("\n".join(lines))
    print("\n".join(lines))


def scale_section(path):
    """The scale tables (idle cost, requests through one host at 1 and N projects) of the
    latest `benches/scale.sh` run, taken from its report at `path`, so this report shows them
    beside the speed tables without running 200 deploys itself. None when there is no report."""
    try:
        text = open(path).read().splitlines()
    except OSError:
        return []
    made = next((l for l in text if l.startswith("Generated by")), "").rstrip(".")
    # Its machine may not be this report's: say which it was.
    host = next((l[len("- Machine: "):] for l in text if l.startswith("- Machine: ")), "").rstrip(".")
    out = ["## Scale: many projects behind one proxy", "",
           f"From `docs/scale.md` ({made[0].lower() + made[1:] if made else 'benches/scale.sh'}"
           f"{'; on ' + host if host else ''}), where "
           "the method and the host's forwarding rules are explained. Since `2e30d54` the load comes from a "
           "network namespace of the run's own, through Docker's DNAT to the proxy's published port, as from a "
           "client on another machine; earlier runs sent it to a port published on 127.0.0.1, which Docker's "
           "userland docker-proxy carries.", ""]
    # Headings by their start: the host control's names its count of idle containers.
    for title in ("## The proxy at idle", "## Requests through one host",
                  "### Which leg the tail grows on: the same load on three paths", "### The tail and the host:"):
        start = next((i for i, l in enumerate(text) if l.startswith(title)), None)
        if start is None:
            continue
        title = text[start]
        rows = []
        for l in text[start + 1:]:
            if l.startswith("|"):
                rows.append(l)
            elif rows:
                break
        out += [f"#{title}" if title.startswith("## ") else title, "", *rows, ""]
    return out


def keep_other_part(path, only, lines):
    """With --only, `lines` has one part: the other part's section ("## HTTP" or "## HTTPS")
    is taken from the existing report at `path`, so a partial run never wipes the rest."""
    try:
        old = open(path).read().splitlines()
    except OSError:
        return lines
    other = "## HTTPS" if only == "http" else "## HTTP"
    start = next((i for i, l in enumerate(old) if l == other), None)
    if start is None:
        return lines
    end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ") or old[i].startswith("Reproduce:")), len(old))
    section = old[start:end]
    # The report's parts in their usual order: HTTP, then HTTPS, then the footer.
    at = next((i for i, l in enumerate(lines) if l.startswith("Reproduce:")), len(lines))
    if only == "tls":
        at = next((i for i, l in enumerate(lines) if l == "## HTTPS"), at)
    return lines[:at] + section + lines[at:]


def write_http(results, worker_counts, names, seconds, repeats):
    lines = ["## HTTP", "", f"Saturation: `wrk -t2 -c64 -d{seconds}s`. Fixed rate: `luma-loadgen --connections 64 --rate R --warmup {FIXED_WARMUP_S}` "
             f"(open loop, latency from the due time; each request sent at its due time by a high-resolution timer, not "
             "in the bursts of tokio's 1 ms timer, which put 1 kHz bursts and the load generator's own "
             f"lateness (about 1.3 ms at the median, direct) into the earlier records; `docs/profile.md`, \"The load generator's clock\") at R = half of nginx's saturation rate, {seconds} s after "
             f"{FIXED_WARMUP_S} s at the same rate that is not counted (its failures are): the steady state. Without it, "
             "each run began with luma-proxy's idle upstream connections expired while the others ran (it keeps them "
             "1.5 s, nginx 60 s), and the reopening fell in the run (see `FIXED_WARMUP_S`). "
             f"All contenders of a worker count run at once, idle but the one measured, in {repeats} rounds in an order "
             "shuffled each round; figures are medians of the rounds, and a ratio is the median of the per-round "
             "ratios with their range in brackets, so a drift of the machine between rounds cancels out. "
             "p99 pooled vs nginx: the p99 of all the rounds' requests together (from luma-loadgen's histograms, buckets "
             "at most 1.6 % wide) over nginx's, with a 95 % interval from resampling whole rounds in pairs (1,000 "
             "draws, seeded): how far another set of rounds like these could move it. Peak RSS: "
             "over the HTTP/1.1 runs.", ""]
    for n in worker_counts:
        base = results[(n, "nginx")]
        direct = results[(n, "direct")]
        rps = lambda r: [x["rps"] for x in r["rounds"]]
        cpu = lambda r: [x["cpu_per_1k"] for x in r["rounds"]]
        lines += [f"### HTTP, {n} worker{'s' if n > 1 else ''}", "",
                  "| contender | req/s | vs nginx | vs direct | CPU s / 1k req | CPU vs nginx | fixed rate | p50 | p99 | "
                  "p99 vs nginx | p99 pooled vs nginx | p99.9 | peak RSS | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in names:
            r = results[(n, name)]
            rss = f"{r['rss']:.1f} MiB" if r["rss"] is not None else "–"
            cpu_vs = ratio_cell(cpu(r), cpu(base)) if name != "direct" else "–"
            lines.append(
                f"| {name} | {r['rps']:,.0f} | {ratio_cell(rps(r), rps(base))} | {ratio_cell(rps(r), rps(direct))} | "
                f"{r['cpu_per_1k']:.3f} | {cpu_vs} | {r['rate']:,}/s | {r['p50_us'] / 1000:.2f} ms | {r['p99_us'] / 1000:.2f} ms | "
                f"{ratio_cell(r['p99_rounds'], base['p99_rounds'])} | {pooled_cell(r['hist_rounds'], base['hist_rounds'])} | "
                f"{r['p999_us'] / 1000:.2f} ms | {rss} | "
                f"{r['errors'] + r['fixed_failed']} |")
        lines.append("")
        lines += instrument_line(results, n, names)
        if "luma-proxy" in names:
            lines += goals(results, n) + [""]
        h2 = [name for name in H2C_NAMES if (n, name, "h2c") in results]
        if "nginx" in h2:
            base = results[(n, "nginx", "h2c")]
            lines += [f"HTTP/2 cleartext (h2c, prior knowledge), {n} worker{'s' if n > 1 else ''}: `h2load -t2 -c{H2_CONNECTIONS} "
                      f"-m{H2_STREAMS} -D{seconds}` ({H2_CONNECTIONS * H2_STREAMS} requests in flight, as wrk's 64), in rounds "
                      "as above, on the same processes (peak RSS covers both protocols).", "",
                      "| contender | h2c req/s | vs nginx | CPU s / 1k req | CPU vs nginx | peak RSS | errors |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for name in h2:
                r = results[(n, name, "h2c")]
                lines.append(f"| {name} | {r['rps']:,.0f} | {ratio_cell(rps(r), rps(base))} | {r['cpu_per_1k']:.3f} | "
                             f"{ratio_cell(cpu(r), cpu(base))} | {r['rss']:.1f} MiB | {r['errors']} |")
            lines.append("")
    return lines


def goals(results, n):
    """luma-proxy against the speed goals of issue 11, from the paired per-round ratios: 'met' when
    the median ratio meets the goal, with how many rounds met it."""
    me, nginx = results[(n, "luma-proxy")], results[(n, "nginx")]
    rps = lambda r: [x["rps"] for x in r["rounds"]]
    cpu = lambda r: [x["cpu_per_1k"] for x in r["rounds"]]
    checks = [("req/s ≥ nginx", rps(me), rps(nginx), True)]
    if (n, "haproxy") in results:
        checks.append(("req/s ≥ HAProxy", rps(me), rps(results[(n, "haproxy")]), True))
    checks += [("CPU per request ≤ nginx", cpu(me), cpu(nginx), False),
               ("p99 at the fixed rate ≤ nginx", me["p99_rounds"], nginx["p99_rounds"], False)]
    lines = [f"Goals, luma-proxy with {n} worker{'s' if n > 1 else ''}:", ""]
    for label, mine, theirs, higher in checks:
        ratios = [a / b for a, b in zip(mine, theirs) if b]
        ok = (lambda x: x >= 1.0) if higher else (lambda x: x <= 1.0)
        if not ratios:
            lines.append(f"- {label}: no round measured it")
            continue
        m = paired(mine, theirs)[0]
        lines.append(f"- {label}: {m:.2f}×, {'met' if ok(m) else 'missed'} "
                     f"({sum(1 for x in ratios if ok(x))} of {len(ratios)} rounds)")
    # The p99 again, over all the rounds' requests (pooled_ratio): the interval says whether the
    # rounds show the goal, or leave it to the draw.
    m, lo, hi = pooled_ratio(me["hist_rounds"], nginx["hist_rounds"])
    if m == m and len(me["hist_rounds"]) > 1:
        verdict = ("the interval lies at or below 1.0 (a rough interval: see pooled_ratio)" if hi <= 1.0 else
                   "missed: the interval lies above 1.0" if lo > 1.0 else "a draw: the interval holds 1.0")
        lines.append(f"- p99 pooled over the rounds ≤ nginx: {m:.2f}× (95 % interval {lo:.2f}–{hi:.2f}), {verdict}")
    # Which rounds' p99 a stall of the VM itself fell on: the runs with steal are marked.
    per_round = lambda r: ", ".join(f"{p / 1000:.2f}" + (f" ({s:.0f} ms stolen)" if s else "")
                                    for p, s in zip(r["p99_rounds"], r["steal_rounds"]))
    lines.append(f"- p99 per round, ms, with the CPU time the hypervisor took from this VM during the run, warm-up "
                 f"included, where it took any (`/proc/stat` steal, all CPUs, counted in clock ticks): "
                 f"luma-proxy {per_round(me)}; nginx {per_round(nginx)}")
    return lines


def instrument_line(results, n, names):
    """How long the fixed-rate requests waited on luma-loadgen itself (`send_late`), and its own
    CPU per request: the part of every latency that is the instrument's, and the CPU it takes
    from the contenders on the same cores."""
    fixed = [results[(n, name)] for name in names if "send_late_rounds" in results[(n, name)]]
    late = [x for r in fixed for x in r["send_late_rounds"]]
    cpu = [x for r in fixed for x in r["loadgen_cpu_rounds"]]
    if not late:
        return []
    return [f"Load generator at the fixed rate, {n} worker{'s' if n > 1 else ''}, over all {len(late)} runs: a request "
            f"waited a median {statistics.median(p50 for p50, _ in late):.0f} µs on the load generator itself, from "
            f"when it was due and its connection free (p99 per run {min(p99 for _, p99 in late)}–"
            f"{max(p99 for _, p99 in late)} µs); its own CPU was {statistics.median(cpu):.1f} µs per request (runs "
            f"{min(cpu):.1f}–{max(cpu):.1f}), on the same two cores.", ""]


def write_tls(results, probes, skipped, resumption, tls_names, worker_counts, seconds, repeats):
    without, with_shim = resumption["without"], resumption["with"]
    lines = [
        "## HTTPS", "",
        f"- Certificate: one ECDSA P-256 leaf for `{TLS_HOST}` from a P-256 CA, both made with openssl for each run; every "
        "contender sends the leaf alone. luma-proxy gets it as the route's custom certificate (a deploy through `luma-proxy call`); "
        "nginx and HAProxy from files (`benches/peers/nginx-tls.conf.in`, `haproxy-tls.cfg.in`, with reasons).",
        "- Servers, all three: TLS 1.2 and 1.3; groups X25519, P-256, P-384; the client's cipher order decides; resumption "
        "through stateless session tickets (2 TLS 1.3 tickets per full handshake) plus a server-side session cache, as "
        "luma-proxy sets up rustls; nginx and HAProxy are set to match (the table below shows what each did).",
        f"- Clients offer TLS 1.3 only, `{TLS13_SUITE}`, `{TLS_GROUP}` (wrk through `OPENSSL_CONF`, h2load with "
        f"`--tls13-ciphers`/`--groups`), SNI `{TLS_HOST}`, connecting to 127.0.0.1 (`benches/tls/resolve.lua` for wrk, "
        "`--connect-to` for h2load). wrk and h2load do not verify certificates; the probe before the runs uses curl and "
        "`openssl s_client` against the run's CA.",
        f"- Keep-alive: `wrk -t2 -c64 -d{seconds}s` over https, median of {repeats}.",
        f"- New TLS handshakes: the same with `-H 'Connection: close'`, one TLS connection per request, median of {repeats}. "
        f"These are **full handshakes** (ECDHE and an ECDSA signature each): wrk alone resumes sessions (TLS 1.3 PSK); in the "
        f"check before the runs nginx logged {without['resumed']:,} of {without['requests']:,} handshakes as resumed without "
        f"`benches/tls/no_resume.c` preloaded into wrk, {with_shim['resumed']:,} of {with_shim['requests']:,} with it. "
        "wrk's own handshake work (ECDHE, verifying the ECDSA signature) takes a large share of the cores in this row, "
        "so the ratios, not the absolute rates, are what to compare.",
        f"- HTTP/2: `h2load -t2 -c{H2_CONNECTIONS} -m{H2_STREAMS} -D{seconds}` with ALPN h2 ({H2_CONNECTIONS * H2_STREAMS} "
        f"requests in flight, as wrk's 64), median of {repeats}.",
        "",
        "Negotiated, as the probe saw it (`openssl s_client`, verified; h2 and HTTP/1.1 by curl):", "",
        "| contender | protocol | cipher | group | tickets per full handshake | resumes a session | 200 over h2 and HTTP/1.1, X-Forwarded-Proto https, the run's leaf |",
        "|---|---|---|---|---:|---|---|",
    ]
    first = worker_counts[0]
    for name in tls_names:
        if name in skipped:
            lines.append(f"| {name} | skipped: {skipped[name]} | | | | | |")
            continue
        p = probes[(first, name)]
        lines.append(f"| {name} | {p['protocol']} | {p['cipher']} | {p['group']} | {p['tickets']} | "
                     f"{'yes' if p['resumes'] else 'no'} | yes |")
    lines.append("")
    for n in worker_counts:
        nginx = results[(n, "nginx")]
        lines += [f"### HTTPS, {n} worker{'s' if n > 1 else ''}", "",
                  "| contender | keep-alive req/s | vs nginx | full handshakes/s | vs nginx | HTTP/2 req/s | vs nginx | "
                  "CPU s / 1k req (keep-alive / handshakes / h2) | peak RSS | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in tls_names:
            if name in skipped:
                lines.append(f"| {name} | skipped: {skipped[name]} | | | | | | | | |")
                continue
            r = results[(n, name)]
            cells = []
            for m in TLS_METRICS:
                cells += [f"{r[m]['rps']:,.0f}", f"{r[m]['rps'] / nginx[m]['rps']:.2f}"]
            cpu = " / ".join(f"{r[m]['cpu_per_1k']:.3f}" for m in TLS_METRICS)
            errors = sum(r[m]["errors"] for m in TLS_METRICS)
            lines.append(f"| {name} | {' | '.join(cells)} | {cpu} | {r['rss']:.1f} MiB | {errors} |")
        lines.append("")
    return lines


if __name__ == "__main__":
    main()
