#!/usr/bin/env bash
# The path without Docker: a single-node Ray head on this machine, bound to loopback.
#   cluster/local/ray_head.sh start [extra `ray start` flags, e.g. --block]
#   ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
#       -- python -m jobs score --config cluster/local/score.yaml --set storage.endpoint_url=http://127.0.0.1:9000
#   cluster/local/ray_head.sh stop       # note: `ray stop` stops every Ray on this machine
# Any S3 endpoint works (MinIO, moto's server, AWS); export its credentials before `start`
# so the Ray workers inherit them: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
# Ray's token authentication stays on: `ray get-auth-token --generate` once, then export
# RAY_AUTH_MODE=token in the shells that start the head and run `ray job submit`
# (or pass the token itself as RAY_AUTH_TOKEN to both).
set -euo pipefail
RAY="${RAY:-ray}"
case "${1:-start}" in
  start)
    shift || true
    exec "$RAY" start --head --node-ip-address=127.0.0.1 --port="${RAY_PORT:-6379}" \
      --dashboard-host=127.0.0.1 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
      --num-cpus="${RAY_NUM_CPUS:-$(nproc)}" --disable-usage-stats "$@" ;;
  stop)
    exec "$RAY" stop ;;
  *)
    echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
