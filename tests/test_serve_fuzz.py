"""Schemathesis over the served OpenAPI schema, against a real uvicorn process: positive and negative requests
for every operation, bounded to about a minute; no request may get a server error, and responses must
match the documented status codes, content types and schemas."""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from cyber_moe.serve.app import _explainer
from test_serve import AUTH, KEY, Server, unsw, unsw_bundles  # noqa: F401  (fixtures)

MAX_EXAMPLES = 100
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance, negative_data_rejection]
SENT: list[tuple[str, str, int]] = []


@pytest.fixture(scope="module")
def fuzz_server(unsw_bundles, tmp_path_factory):
    env = {"CYBER_MOE_API_KEY": KEY, "CYBER_MOE_MAX_BATCH": "8", "CYBER_MOE_TORCH_THREADS": "1"}
    with Server(unsw_bundles[0], log_path=tmp_path_factory.mktemp("fuzz") / "server.log", env=env) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", headers=AUTH)
    neg = schema.config.checks.negative_data_rejection  # a batch over maxItems is refused with 413 (too large), not 4xx-in-general
    neg.expected_statuses = [*neg.expected_statuses, "413"]
    return schema


def _fuzz(op, mode, failures: list) -> None:
    "Run hypothesis over one operation in one generation mode; record failures instead of stopping at the first."

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=not os.environ.get("FUZZ_RANDOM"),  # CI gates on the same examples every run; FUZZ_RANDOM=1 explores new ones
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    def run(case):
        if mode == GenerationMode.NEGATIVE and any(isinstance(v, (list, dict)) for v in (case.query or {}).values()):
            reject()  # a list or object in the query goes on the wire as plain parameters (repeated, key=value, or none when empty):
            # a one-item list or a one-key object can read as a valid request; repeated parameters get a 422 (tests/test_feedback.py)
        r = case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=30)
        SENT.append((op.label, mode.value, r.status_code))
        if mode.value == "positive" and r.status_code == 422 and os.environ.get("FUZZ_DEBUG"):
            print("POS422", op.label, r.text[:300])

    try:
        run()
    except Unsatisfiable:
        pass  # nothing to negate (no parameters, no body): GET /health and friends
    except (Exception, BaseExceptionGroup) as e:
        failures.append(f"{op.label} [{mode.value}]: {str(e)[:1500]}")


def test_schemathesis_finds_no_server_error(api_schema, fuzz_server):
    "Positive and negative requests for every operation (the pytest plugin's lazy mode breaks on pytest 9, so hypothesis runs directly)."
    # /admin/reload loads whatever URI it is given (a generated "s3://..." would make MLflow reach for the network);
    # tests/test_serve.py covers it.
    # /explain answers 501 (a 5xx by design) until cyber_moe.explain exists; fuzz it once it does.
    failures: list[str] = []
    skip = ["/admin/reload"] + (["/explain"] if _explainer()[0] is None else [])
    ops = [r.ok() for r in api_schema.exclude(path=skip).get_all_operations()]
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(op, mode, failures)
    assert not failures, "\n\n".join(failures)
    labels = {label for label, _, _ in SENT}
    assert len(SENT) >= 1000, f"only {len(SENT)} requests"
    assert labels == {op.label for op in ops} and len(labels) >= 11, sorted(labels)
    print(
        f"{len(SENT)} requests over {len(labels)} operations;",
        {c: sum(x == c for _, _, x in SENT) for c in sorted({x for _, _, x in SENT})},
    )
    ok = sum(code == 200 for label, mode, code in SENT if label in ("POST /predict", "POST /predict_batch"))
    assert ok >= 20, f"only {ok} generated flows were scored: the generator hardly reaches the model"
    rejected = sum(400 <= code < 500 for label, mode, code in SENT if mode == "negative")
    assert rejected >= 100, f"only {rejected} negative requests were rejected"
    assert "Traceback" not in fuzz_server.log()
