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
# The API key comes from CYBER_MOE_API_KEY or from a Docker secret file (CYBER_MOE_API_KEY_FILE). Without a key the
# service answers anyone, so the container refuses to start with a missing, unreadable, empty or blank key unless
# CYBER_MOE_ALLOW_OPEN=true says that an open service is intended (e.g. behind an authenticating proxy).
blank() { [ -z "$(printf '%s' "$1" | tr -d '[:space:]')" ]; }
key_source="CYBER_MOE_API_KEY"
if blank "${CYBER_MOE_API_KEY:-}" && [ -n "${CYBER_MOE_API_KEY_FILE:-}" ]; then
  key_source="the key file $CYBER_MOE_API_KEY_FILE"
  if [ -r "$CYBER_MOE_API_KEY_FILE" ] && [ -f "$CYBER_MOE_API_KEY_FILE" ]; then
    CYBER_MOE_API_KEY="$(cat "$CYBER_MOE_API_KEY_FILE")"
  else
    key_source="the key file $CYBER_MOE_API_KEY_FILE (missing or unreadable)"
    CYBER_MOE_API_KEY=""
  fi
fi
if blank "${CYBER_MOE_API_KEY:-}"; then
  case "$(printf '%s' "${CYBER_MOE_ALLOW_OPEN:-}" | tr '[:upper:]' '[:lower:]')" in
    1|true|yes|on)
      echo "docker-entrypoint: WARNING: no API key ($key_source gives none); CYBER_MOE_ALLOW_OPEN is set, so every route is open to anyone who can connect" >&2
      unset CYBER_MOE_API_KEY ;;
    *)
      echo "docker-entrypoint: error: no API key: $key_source gives an empty key. Put a key in the secret file" \
           "(head -c 24 /dev/urandom | base64 > deploy/secrets/api_key) or set CYBER_MOE_API_KEY;" \
           "set CYBER_MOE_ALLOW_OPEN=true only if the service is meant to run without one" >&2
      exit 78 ;;
  esac
else
  export CYBER_MOE_API_KEY
fi
exec "$@"
