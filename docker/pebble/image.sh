#!/usr/bin/env bash
# Builds a throwaway image that runs Debian's pebble (a real ACME server for tests) and
# pebble-challtestsrv (its DNS), and prints its tag. Nothing is pulled: the image is a
# `docker import` of a root filesystem holding the two host binaries, the loader and libc they
# link against, and a static busybox as the shell that starts both. The tag is a hash of all of
# that content, so the image is built once per content and reused (a second call only looks it
# up). Needs the Debian packages `pebble` and `busybox-static` (.ci/run installs them).
#
# Usage: docker/pebble/image.sh   -> prints e.g. luma-t-pebble:3f2a9c0d1b7e
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

bins=(/usr/bin/pebble /usr/bin/pebble-challtestsrv)
busybox=/usr/bin/busybox
for f in "${bins[@]}" "$busybox"; do
  [[ -x $f ]] || { echo "$0: $f is missing: apt-get install pebble busybox-static" >&2; exit 1; }
done
# ldd fails on a static binary ("not a dynamic executable").
if ldd "$busybox" >/dev/null 2>&1; then
  echo "$0: $busybox is not static: apt-get install busybox-static" >&2
  exit 1
fi

# The shared objects the binaries load (loader and libc), by the paths they ask for.
libs=$(ldd "${bins[@]}" | awk '/=> \//{print $3} $1 ~ /^\// && $2 ~ /^\(0x/ {print $1}' | sort -u)

# The tag hashes every file's path and bytes, and the start script.
tag=$(
  for f in "${bins[@]}" "$busybox" $libs "$here/start.sh"; do
    printf '%s ' "$f"
    sha256sum < "$(readlink -f "$f")"
  done | sha256sum | cut -c1-12
)
image="luma-t-pebble:$tag"
if docker image inspect --format '{{.Id}}' "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/usr/bin" "$root/etc/pebble" "$root/tmp"
chmod 1777 "$root/tmp"
for f in "${bins[@]}" $libs; do
  mkdir -p "$root$(dirname "$f")"
  cp -L "$f" "$root$f"
done
cp -L "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$here/start.sh" "$root/start.sh"
chmod 0755 "$root/start.sh"

tar -C "$root" --numeric-owner --owner=0 --group=0 -cf - . |
  docker import \
    --change 'LABEL luma.test=1' \
    --change 'ENV PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0' \
    --change 'CMD ["/bin/sh", "/start.sh"]' \
    - "$image" >/dev/null
echo "$image"
