"""An nginx image made from this host's own nginx, for the harnesses' container peers.

No registry is reachable here, so nothing can be pulled: the image is `docker import`ed from a
root filesystem of the host's nginx binary, the shared libraries `ldd` names for it, and the
few files it reads at start (`/etc/passwd` and `/etc/group`, for its workers' user `nobody`).
The harness's config is baked in, so the container runs exactly the fair peer of
`benches/compare.py`, with the same binary as the native nginx beside it: a peer deployed as
luma-proxy is, in a container on Docker's bridges, to tell what the container shape costs any
proxy from what it costs luma-proxy.
"""

import io
import os
import re
import subprocess
import tarfile

# Where the peer keeps its config, temp files and error log inside the image.
HOME = "/nginx"
PORT = 8080  # the port nginx listens on inside its container, like luma-proxy's


def shared_libraries(binary):
    """The absolute paths `ldd` lists for `binary`, the loader included; ValueError when it
    lists none (a static binary, or no ldd), which the caller reports."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30).stdout
    libs = re.findall(r"(/\S+) \(0x", out)
    if not libs:
        raise ValueError(f"`ldd {binary}` named no shared library: {out[:200]!r}")
    return libs


def rootfs(binary, config):
    """A tar (bytes) of the image's root filesystem: `binary` at /usr/sbin/nginx, its libraries at
    their own paths (symlinks resolved), `config` at HOME/nginx.conf and the directories it
    writes to."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add_bytes(path, data, mode=0o644):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        def add_dir(path):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)

        for d in ("/tmp", "/etc", HOME, *(f"{HOME}/{t}" for t in ("body", "proxy", "fastcgi", "uwsgi", "scgi"))):
            add_dir(d)
        with open(binary, "rb") as f:
            add_bytes("/usr/sbin/nginx", f.read(), 0o755)
        for lib in shared_libraries(binary):
            with open(os.path.realpath(lib), "rb") as f:
                add_bytes(lib, f.read(), 0o755)
        add_bytes("/etc/passwd", b"root:x:0:0:root:/:/nonexistent\nnobody:x:65534:65534:nobody:/:/nonexistent\n")
        add_bytes("/etc/group", b"root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\n")
        add_bytes(f"{HOME}/nginx.conf", config.encode())
    return buf.getvalue()


def build(tag, config, docker, workdir, binary):
    """`docker import`s the image as `tag` (which the caller removes), its entrypoint nginx in the
    foreground with `config`; the root filesystem's tar is written under `workdir` first.
    `docker` is the harness's own runner, which raises on failure."""
    path = os.path.join(workdir, "nginx-rootfs.tar")
    with open(path, "wb") as f:
        f.write(rootfs(binary, config))
    entry = f'ENTRYPOINT ["/usr/sbin/nginx", "-p", "{HOME}", "-c", "{HOME}/nginx.conf", "-e", "stderr", ' \
            '"-g", "daemon off;"]'
    docker("import", "--change", entry, path, tag, timeout=300)
