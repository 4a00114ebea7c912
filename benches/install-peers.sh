#!/usr/bin/env bash
# Installs the benchmark peers and load tools from Debian: nginx, haproxy, wrk, h2load
# (nghttp2-client, for HTTP/2 over TLS), openssl and curl (the HTTPS certificate and probe), and
# caddy if it installs. Services are not started by the install (policy-rc.d), so nothing binds
# port 80.
set -euo pipefail
need=()
# command -> Debian package
for pair in nginx:nginx haproxy:haproxy wrk:wrk h2load:nghttp2-client openssl:openssl curl:curl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
want_caddy=0
command -v caddy >/dev/null 2>&1 || want_caddy=1
if [ ${#need[@]} -eq 0 ] && [ $want_caddy -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "install-peers: need root to apt-get install ${need[*]} caddy" >&2
  exit 1
fi
made_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
fi
trap '[ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ $want_caddy = 1 ]; then
  apt-get install -y -qq --no-install-recommends caddy >/dev/null || echo "install-peers: caddy did not install; it is left out" >&2
fi
