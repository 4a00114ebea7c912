#!/usr/bin/env python3
"""Where luma-proxy's memory goes per idle keep-alive connection: a heap profile, not a guess.

Runs luma-proxy (1 worker) under valgrind's massif in front of the demo backend, opens N client
connections with `luma-idle` (`--mode h1`: one HTTP/1.1 request each; `h2`: one h2c request
each; `ws`: a WebSocket tunnel each, to `luma-idle ws-backend`) that then stay open and idle,
waits until they are settled (parked, for a proxy that parks), and asks massif for a detailed
snapshot of the live heap through vgdb. Prints the heap's growth per idle connection, split by the allocation
site that owns it (the first frame outside the allocator), and the same for a baseline snapshot
taken before the connections opened.

    benches/heap.py [--binary BIN] [--mode h1|h2|ws] [--connections 1000] [--wait 5]

massif sees malloc only, so profile a build without mimalloc (the sizes asked for are the
same; what the allocator keeps besides is measured by benches/idle.py):

    cargo build --release -p luma-proxy --no-default-features --target-dir target/heap
    benches/heap.py --binary target/heap/release/luma-proxy

Needs valgrind (massif, vgdb) and the release binaries of luma-demo-backend and luma-idle
(`cargo build --release -p luma-demo-backend -p luma-benches`). Uses ports 18300-18302;
leaves nothing running.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (wait_port, REL)

BACKEND, PROXY, ADMIN = 18300, 18301, 18302
# Frames that are the allocator or its plumbing, skipped to find who asked for the memory.
PLUMBING = re.compile(
    r"(malloc|calloc|realloc|alloc::|__rust_|__rdl_|RawVec|raw_vec|_alloc|exchange_malloc|"
    r"bytes::bytes_mut::BytesMut::reserve|BytesMut::with_capacity|Vec<.*>::with_capacity|"
    r"Vec<.*>::reserve|hashbrown::raw|Box<.*>::new|core::ptr::|__libc|_dl_)")


def open_idle(n, port, mode):
    """Starts luma-idle with N idle connections through the proxy; returns it once they are open."""
    client = subprocess.Popen([f"{compare.REL}/luma-idle", "open", "--addr", f"127.0.0.1:{port}", "--mode", mode,
                               "--count", str(n), "--host", "heap.test"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = client.stdout.readline()
    event = json.loads(line) if line else {}
    if event.get("event") != "opened" or event.get("failed"):
        client.kill()
        raise RuntimeError(f"luma-idle could not open {n} {mode} connections: {line.strip()}")
    return client


def snapshot(pid, path):
    subprocess.run(["vgdb", f"--pid={pid}", "detailed_snapshot", path], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    for _ in range(100):
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return
        time.sleep(0.1)
    raise RuntimeError("massif wrote no snapshot")


def by_site(path):
    """Bytes of the live heap per owning site, from a massif detailed snapshot."""
    text = open(path).read()
    total = int(re.search(r"mem_heap_B=(\d+)", text).group(1))
    extra = int(re.search(r"mem_heap_extra_B=(\d+)", text).group(1))
    sites = {}
    # heap_tree lines: indentation, "nN: BYTES 0xADDR: function (file)".
    stack = []
    for line in text.split("heap_tree=detailed", 1)[1].splitlines()[1:]:
        m = re.match(r"^( *)n(\d+): (\d+) (.*)$", line)
        if not m:
            continue
        depth, children, size, what = len(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
        stack = stack[:depth] + [(what, size, children)]
        if children:
            continue
        # A leaf: attribute its bytes to the first frame below the allocator's plumbing.
        names = [re.sub(r"^0x[0-9A-F]+: ", "", w) for w, _, _ in stack[1:]]
        owner = next((n for n in names if not PLUMBING.search(n)), names[-1] if names else "?")
        owner = re.sub(r" \(.*\)$", "", owner)[:140]
        sites[owner] = sites.get(owner, 0) + size
    return total, extra, sites


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(compare.REL, "luma-proxy"))
    ap.add_argument("--mode", choices=["h1", "h2", "ws"], default="h1")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--wait", type=float, default=4.0, help="seconds idle before the snapshot (parking takes 1-2 s)")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    for tool in ("valgrind", "vgdb"):
        if not shutil.which(tool):
            sys.exit(f"heap.py: {tool} is missing (apt-get install valgrind)")
    tmp = tempfile.mkdtemp(prefix="luma-heap-")
    procs = []
    try:
        if a.mode == "ws":
            procs.append(subprocess.Popen([f"{compare.REL}/luma-idle", "ws-backend", "--listen", f"127.0.0.1:{BACKEND}"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        else:
            procs.append(subprocess.Popen([f"{compare.REL}/luma-demo-backend"],
                                          env=dict(os.environ, PORT=str(BACKEND), BIND="127.0.0.1", DEMO_BODY_BYTES="1024"),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        compare.wait_port(BACKEND, proc=procs[-1])
        state = os.path.join(tmp, "state")
        proxy = subprocess.Popen(
            ["valgrind", "--tool=massif", "--vgdb=yes",
             f"--massif-out-file={tmp}/massif.out", "--threshold=0.1", "--depth=40",
             a.binary, "serve", "--http", f"127.0.0.1:{PROXY}", "--https", "127.0.0.1:0",
             "--admin", f"127.0.0.1:{ADMIN}", "--state-dir", state, "--no-access-log", "--workers", "1",
             "--allow-literal-targets", "--acme-directory", "off", "--metrics", "off",
             "--header-read-timeout", "600s", "--idle-timeout", "600s", "--max-connections", str(a.connections + 100)],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "proxy.log"), "w"))
        procs.append(proxy)
        compare.wait_port(PROXY, timeout=60, proc=proxy)
        subprocess.run([a.binary, "deploy", "--admin", f"127.0.0.1:{ADMIN}", "--state-dir", state,
                        "--host", "heap.test", "--project", "heap", "--target", f"127.0.0.1:{BACKEND}"],
                       check=True, stdout=subprocess.DEVNULL, timeout=120)
        time.sleep(a.wait)
        snapshot(proxy.pid, f"{tmp}/before.ms")
        client = open_idle(a.connections, PROXY, a.mode)
        procs.append(client)
        time.sleep(a.wait)
        snapshot(proxy.pid, f"{tmp}/idle.ms")
        client.stdin.close()  # luma-idle closes every connection at the end of its input
        b_total, b_extra, b_sites = by_site(f"{tmp}/before.ms")
        i_total, i_extra, i_sites = by_site(f"{tmp}/idle.ms")
        n = a.connections
        print(f"binary: {a.binary}")
        print(f"{n} idle {a.mode} connections; live heap {b_total / 1024:.0f} KiB before, {i_total / 1024:.0f} KiB idle; "
              f"allocator overhead {b_extra / 1024:.0f} -> {i_extra / 1024:.0f} KiB")
        print(f"per idle connection: {(i_total - b_total) / n:.0f} B requested + "
              f"{(i_extra - b_extra) / n:.0f} B allocator overhead")
        growth = {k: i_sites.get(k, 0) - b_sites.get(k, 0) for k in set(i_sites) | set(b_sites)}
        print("\n| bytes per idle connection | allocated by |\n|---:|---|")
        for site, d in sorted(growth.items(), key=lambda kv: -kv[1])[:a.top]:
            if d <= 0:
                break
            print(f"| {d / n:,.0f} | `{site}` |")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
