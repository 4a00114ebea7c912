#!/usr/bin/env python3
"""Deploys under load: `luma deploy` 20 times while a fixed-rate load runs against the host,
then, for contrast, the same load against nginx during 20 `nginx -s reload`.

Reports requests sent, non-2xx responses, socket errors and timeouts; p99 latency of requests
due during a deploy (or reload) against p99 between them; and the median time from starting
`luma deploy` to the first response from the new release. Nothing is asserted.

Usage: benches/deploys_under_load.py [--deploys 20] [--rate 400] [--out docs/deploys-under-load.md]
Needs the images (docker/build-images.sh) and release binaries (benches/deploys.sh does both).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
HTTP, HTTPS, NGINX, BACKEND = 18200, 18243, 18202, 18210


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))] if xs else 0


def run_load(port, host, rate, seconds, records):
    out = subprocess.run([f"{REL}/luma-loadgen", "--addr", f"127.0.0.1:{port}", "--host", host, "--connections", "32",
                          "--rate", str(rate), "--duration", str(seconds), "--records", records],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def analyse(records, windows):
    inside, outside = [], []
    rows = []
    with open(records) as f:
        for line in f:
            due, lat, outcome, release = line.split()
            rows.append((int(due), int(lat), outcome, release))
            (inside if any(a <= int(due) <= b for a, b in windows) else outside).append(int(lat))
    return rows, p99(inside), p99(outside)


def switch_times(rows, windows):
    """Per deploy: ms from its start to the first response from a release not seen before it."""
    out = []
    for start, _ in windows:
        before = {r for d, _, o, r in rows if d < start and r != "-"}
        later = [d for d, _, o, r in rows if d >= start and r != "-" and r not in before]
        if later:
            out.append(later[0] - start)
    return out


def now_ms():
    return int(time.time() * 1000)


def luma_runs(a, tmp):
    # The host's firewall outlives this bench: luma's fast-path rule (luma-cli/src/hostpath.rs)
    # stays off.
    env = dict(os.environ, LUMA_PROXY_NAME="luma-bench-proxy", LUMA_HTTP_PORT=f"127.0.0.1:{HTTP}",
               LUMA_HTTPS_PORT=f"127.0.0.1:{HTTPS}", LUMA_HOST_FAST_PATH="off")
    proj = os.path.join(tmp, "bench")
    os.makedirs(proj)
    open(os.path.join(proj, "luma.yml"), "w").write(
        "name: luma-bench\napps:\n  web:\n    image: luma-demo:dev\n    replicas: 2\n"
        "    health_check: {path: /up, interval: 200ms}\n    proxy: {hosts: [bench.test], app_port: 3000}\n")
    luma = [f"{REL}/luma", "-c", os.path.join(proj, "luma.yml")]
    subprocess.run(luma + ["deploy"], env=env, check=True, capture_output=True)
    windows, durations = [], []
    records = os.path.join(tmp, "luma.records")
    seconds = a.deploys * 4 + 6
    result = {}
    t = threading.Thread(target=lambda: result.update(run_load(HTTP, "bench.test", a.rate, seconds, records)))
    t.start()
    time.sleep(3)
    try:
        for _ in range(a.deploys):
            start = now_ms()
            subprocess.run(luma + ["deploy"], env=env, check=True, capture_output=True)
            end = now_ms()
            windows.append((start, end))
            durations.append(end - start)
            time.sleep(max(0.0, 4 - (end - start) / 1000))
        t.join()
    finally:
        subprocess.run(luma + ["remove", "--yes"], env=env, capture_output=True)
        subprocess.run(["docker", "rm", "-f", "-v", "luma-bench-proxy"], capture_output=True)
        subprocess.run(["docker", "volume", "rm", "luma-bench-proxy-state"], capture_output=True)
    rows, p_in, p_out = analyse(records, windows)
    return result, p_in, p_out, statistics.median(switch_times(rows, windows) or [0]), statistics.median(durations)


def nginx_runs(a, tmp):
    backend = subprocess.Popen([f"{REL}/luma-demo-backend"], env=dict(os.environ, PORT=str(BACKEND), BIND="127.0.0.1"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conf = os.path.join(tmp, "nginx.conf")
    os.makedirs(os.path.join(tmp, "body"), exist_ok=True)
    text = open(os.path.join(ROOT, "benches/peers/nginx.conf.in")).read()
    for k, v in dict(workers=2, tmp=tmp, port=NGINX, backend_port=BACKEND).items():
        text = text.replace("{" + k + "}", str(v))
    open(conf, "w").write(text)
    nginx = subprocess.Popen(["nginx", "-p", tmp, "-c", conf, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    records = os.path.join(tmp, "nginx.records")
    windows = []
    result = {}
    seconds = a.deploys * 4 + 6
    t = threading.Thread(target=lambda: result.update(run_load(NGINX, "bench.test", a.rate, seconds, records)))
    t.start()
    time.sleep(3)
    try:
        for _ in range(a.deploys):
            start = now_ms()
            subprocess.run(["nginx", "-p", tmp, "-c", conf, "-s", "reload"], check=True, capture_output=True)
            time.sleep(0.5)  # the reload completes asynchronously; count half a second as its window
            windows.append((start, now_ms()))
            time.sleep(3.5)
        t.join()
    finally:
        nginx.terminate()
        nginx.wait()
        backend.terminate()
        backend.wait()
    _, p_in, p_out = analyse(records, windows)
    return result, p_in, p_out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deploys", type=int, default=20)
    ap.add_argument("--rate", type=int, default=400)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "deploys-under-load.md"))
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="luma-deploys-")
    try:
        lr, l_in, l_out, switch_ms, deploy_ms = luma_runs(a, tmp)
        nr, n_in, n_out = nginx_runs(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = lambda r: r["non_2xx"] + r["socket_errors"] + r["timeouts"]
    lines = [
        "# Deploys under load",
        "",
        f"Generated by `benches/deploys_under_load.py` on {time.strftime('%Y-%m-%d')}: {a.deploys} deploys while "
        f"`luma-loadgen` sends {a.rate} req/s (open loop, 32 keep-alive connections) to the host; the app has 2 replicas "
        "of a prebuilt image. For contrast, the same load against nginx during the same number of `nginx -s reload`.",
        "",
        "| run | requests | non-2xx | socket errors | timeouts | p99 during switches | p99 between |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| luma deploy x{a.deploys} | {lr['sent']:,} | {lr['non_2xx']} | {lr['socket_errors']} | {lr['timeouts']} | {l_in / 1000:.2f} ms | {l_out / 1000:.2f} ms |",
        f"| nginx -s reload x{a.deploys} | {nr['sent']:,} | {nr['non_2xx']} | {nr['socket_errors']} | {nr['timeouts']} | {n_in / 1000:.2f} ms | {n_out / 1000:.2f} ms |",
        "",
        f"- Median time from starting `luma deploy` to the first response from the new release: **{switch_ms:.0f} ms**; "
        f"median duration of the whole `luma deploy` (including draining and stopping the old release): {deploy_ms / 1000:.1f} s.",
        f"- Failed requests: luma {failed(lr)}, nginx {failed(nr)}.",
        "",
        "Reproduce: `benches/deploys.sh`.",
        "",
    ]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    open(a.out, "w").write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
