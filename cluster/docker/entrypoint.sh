#!/bin/sh
# Container entrypoint for managed endpoints. The platforms differ only in the port they probe:
#   SageMaker runs the image with the argument `serve` and talks to port 8080 (/ping, /invocations);
#   Vertex AI sets AIP_HTTP_PORT (and AIP_HEALTH_ROUTE / AIP_PREDICT_ROUTE, which the API reads itself);
#   Azure ML probes the port and routes of the deployment (use 8080, /ping and /score).
# Inside a container the API must listen on all interfaces; set HOMEFIRE_API_KEY unless the platform authenticates.
set -eu
if [ "${1:-serve}" = "serve" ]; then
  shift 2>/dev/null || true
  port="${AIP_HTTP_PORT:-${PORT:-8080}}"
  config="${HOMEFIRE_SERVE_CONFIG:-}"
  exec homefire serve ${config:+"$config"} --host 0.0.0.0 --port "$port" "$@"
fi
exec "$@"
