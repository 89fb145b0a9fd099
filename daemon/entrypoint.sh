#!/bin/sh
# raft-stream container entrypoint.
#
#   <image> generator|trainer|run|broker [extra flags]  ->  raft-stream <role> --config $RAFT_STREAM_CONFIG [extra flags]
#   <image> healthcheck                                 ->  exit 0 when /healthz answers 200
#   <image> <any other raft-stream command> [args]      ->  raft-stream <command> [args]   (produce, config, offline, ...)
#
# RAFT_STREAM_CONFIG (default /etc/raft-stream/config.yaml) is passed when the file exists;
# without it the daemon runs on its defaults plus RAFT_STREAM_* environment variables.
set -eu

config="${RAFT_STREAM_CONFIG:-/etc/raft-stream/config.yaml}"
role="${1:-run}"
[ "$#" -gt 0 ] && shift

case "$role" in
    generator | trainer | run | broker)
        if [ -f "$config" ]; then
            exec raft-stream "$role" --config "$config" "$@"
        fi
        echo "raft-stream: no config file at $config; using defaults and RAFT_STREAM_* variables" >&2
        exec raft-stream "$role" "$@"
        ;;
    healthcheck)
        exec python - <<'PY'
import os
import sys
import urllib.request

port = os.environ.get("RAFT_STREAM_SERVER__PORT", "9400")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as resp:
        sys.exit(0 if resp.status == 200 else 1)
except OSError as exc:
    print(f"healthcheck: {exc}", file=sys.stderr)
    sys.exit(1)
PY
        ;;
    -h | --help | help)
        sed -n '2,9p' "$0"
        ;;
    *)
        exec raft-stream "$role" "$@"
        ;;
esac
