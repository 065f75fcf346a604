"""The REST service as uvicorn imports it (`uvicorn app.main:app`): builds the app from the environment, nothing else.

CYBER_MOE_MODEL names the bundle to serve (a folder or an MLflow URI); every other setting comes from the
variables listed in `cyber_moe.serve.ENV_VARS` (CYBER_MOE_API_KEY, CYBER_MOE_MAX_BATCH, PROMETHEUS_MULTIPROC_DIR, ...).
"""
import os

from cyber_moe.serve import MODEL_ENV_VAR, create_app, settings_from_env


def build_app():
    "The app for the model and settings in the environment; a clear error when no model is named."
    uri = os.environ.get(MODEL_ENV_VAR, "").strip()
    if not uri:
        raise RuntimeError(f"{MODEL_ENV_VAR} is not set: set it to the model bundle folder or MLflow URI to serve, "
                           "e.g. outputs/default/model or models:/cyber-moe-unsw-nb15/1")
    return create_app(uri, settings_from_env(os.environ))


app = build_app()
