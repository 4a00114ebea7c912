#!/bin/sh
# PID 1 of the test pebble image (docker/pebble/image.sh): challtestsrv as the DNS server pebble
# asks (answers are set through its management API on :8055; no IPv6 answer, because pebble
# dials the first address it gets), then pebble itself with the config the test copied into
# /etc/pebble. If either dies the container stops, so a test sees it instead of hanging.
/usr/bin/pebble-challtestsrv -defaultIPv4 127.0.0.1 -defaultIPv6 "" \
  -http01 "" -https01 "" -tlsalpn01 "" -dns01 :8053 -management :8055 &
dns=$!
/usr/bin/pebble -config /etc/pebble/config.json -dnsserver 127.0.0.1:8053 &
ca=$!
# busybox sh has no `wait -n`: poll until one of them is gone.
while kill -0 "$dns" 2>/dev/null && kill -0 "$ca" 2>/dev/null; do
  /bin/busybox sleep 1
done
echo "start.sh: pebble or challtestsrv exited" >&2
exit 1
