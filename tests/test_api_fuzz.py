"""Schemathesis fuzzes every operation of the OpenAPI schema against a real server: no 5xx, ever.

Bounded: a fixed number of generated requests per operation (``FUZZ_EXAMPLES``, about 20 s in all on
2 cores), so it runs in CI with the rest of the suite.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from serving import detectors_dir, metric_value, running_server

FUZZ_EXAMPLES = 40


@pytest.fixture(scope="module")
def api_schema(ood_assets, tmp_path_factory):
    root = detectors_dir(tmp_path_factory.mktemp("fuzz"), {"tiny": ood_assets.ce})
    env = {
        "OODFORGE_DETECTORS_DIR": str(root),
        "OODFORGE_LIMITS__MAX_FILES": "8",
        "OODFORGE_LIMITS__MAX_IMAGE_PIXELS": str(256 * 256),
    }
    with running_server(env, tmp_path_factory.mktemp("logs") / "fuzz.log") as server:
        yield server, schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_no_operation_answers_with_a_server_error(api_schema):
    server, api_schema = api_schema
    # hypothesis drives schemathesis' strategies directly (its pytest plugin does not support pytest 9)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/score", "/detectors", "/detectors/{name}", "/metrics"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def fuzz(case):
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        fuzz()
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "oodforge_requests_total", method="POST", path="/score") >= FUZZ_EXAMPLES // 2
    assert metric_value(text, "oodforge_errors_total", status="500") == 0
