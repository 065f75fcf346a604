#!/bin/sh
# Start the REST service with an empty Prometheus multiprocess directory (stale files from a previous
# container run would be summed into the metrics), then run the command (uvicorn by default).
set -eu
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
  rm -rf "$PROMETHEUS_MULTIPROC_DIR"
  mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
fi
# Workers share reloads through CYBER_MOE_RELOAD_DIR; a container starts from its configured model, not from
# a reload published before a restart.
if [ -n "${CYBER_MOE_RELOAD_DIR:-}" ]; then
  rm -rf "$CYBER_MOE_RELOAD_DIR"
  mkdir -p "$CYBER_MOE_RELOAD_DIR"
fi
# The API key may come from a Docker secret file instead of the environment.
if [ -z "${CYBER_MOE_API_KEY:-}" ] && [ -n "${CYBER_MOE_API_KEY_FILE:-}" ] && [ -r "$CYBER_MOE_API_KEY_FILE" ]; then
  CYBER_MOE_API_KEY="$(cat "$CYBER_MOE_API_KEY_FILE")"
  export CYBER_MOE_API_KEY
fi
exec "$@"
