#!/usr/bin/env bash
# Make sure a Redis answers at the test URL: use the one running, else start one (installing it if needed).
set -euo pipefail
url="${1:-redis://127.0.0.1:6379/15}"
hostport="${url#redis://}"; hostport="${hostport%%/*}"; hostport="${hostport##*@}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$host" ] && port=6379

answers() { (exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }

# Tests that start Redis processes of their own (the fault tests, the Sentinel failover test) need redis-server
# even when a Redis already answers: install it where we can (Debian's package includes sentinel mode).
if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing redis-server (Debian package)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
if answers; then
  command -v redis-server >/dev/null 2>&1 || echo "warning: no redis-server: the fault and Sentinel tests will fail" >&2
  exit 0
fi
case "$host" in 127.*|localhost) ;; *) echo "no Redis answers at $url and it is not local: start it" >&2; exit 1;; esac
if ! command -v redis-server >/dev/null 2>&1; then
  echo "no Redis at $url and no redis-server to start: install Redis (e.g. apt-get install redis-server)" >&2
  exit 1
fi
dir="$(pwd)/.redis-test"; mkdir -p "$dir"
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
  --dir "$dir" --logfile "$dir/redis.log" --pidfile "$dir/redis.pid"
for _ in $(seq 50); do answers && { echo "started redis-server on $host:$port" >&2; exit 0; }; sleep 0.1; done
echo "redis-server did not start; see $dir/redis.log" >&2; exit 1
