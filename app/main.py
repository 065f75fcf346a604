"""The REST service as uvicorn imports it from a checkout (`uvicorn app.main:app`): a thin shell over the package.

The service starts from the installed package (`uvicorn --factory cyber_moe.serve.app:app_from_env`, as
`cyber-moe serve` and the container do); this module is the same app for tools that want a module-level
`app`. CYBER_MOE_MODEL names the bundle to serve; every other setting comes from the CYBER_MOE_* variables
of `cyber_moe.serve.ServeSettings` (CYBER_MOE_API_KEY, CYBER_MOE_MAX_BATCH, PROMETHEUS_MULTIPROC_DIR, ...).
"""

from cyber_moe.serve.app import app_from_env

app = app_from_env()
