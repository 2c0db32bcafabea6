"""Issue 15, "what it must show": Schemathesis generates requests from the server's own OpenAPI
schema (every route, every field, strings over all of Unicode with NUL, control characters,
other planes; headers and path ids too) and sends them to a real server: no answer is a 5xx.

Lone surrogates cannot be sent as UTF-8, so Schemathesis leaves them out; test_security_input.py
sends them as JSON escapes. A few examples per route keep the run near a minute on two cores:

    pytest tests/test_security_schema.py                  # SCHEMATHESIS_EXAMPLES=30 for a longer run
"""

import os
from collections import Counter

import hypothesis
import hypothesis.strategies as st
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from parley.engine.config import EngineConfig
from parley.serve.app import create_app
from parley.serve.settings import Settings
from serving import serving
from test_serve import make_users

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "10"))


@pytest.fixture(scope="module")
def api(tiny768_own_home, tmp_path_factory):
    db = str(tmp_path_factory.mktemp("db") / "parley.db")
    keys = make_users(db, ann="admin")  # an admin's fuzzed requests may change the registry: its own copy of it
    settings = Settings(db=db, home=tiny768_own_home, model="tiny768", engine=EngineConfig(dtype="float32"),
                        stages=["safety_in", "respond"], max_tokens=2, requests_per_minute=0,
                        failed_auth_per_minute=0, max_embedding_inputs=8, max_embedding_chars=2000)
    with serving(create_app(settings)) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        schema.config.update(base_url=url, headers={"Authorization": f"Bearer {keys['ann']}"})
        schema.config.generation.update(codec=None, allow_x00=True)  # all of Unicode but lone surrogates
        yield schema


def test_no_request_the_schema_allows_is_a_5xx(api):
    """Every operation of the schema, EXAMPLES generated requests each (positive and negative
    modes: valid and invalid bodies, parameters, headers)."""
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15  # every route is in the schema

    statuses = Counter()
    for operation in operations:
        strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

        @hypothesis.given(case=strategy)
        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def no_server_error(case):
            response = case.call_and_validate(checks=[not_a_server_error], timeout=60)
            statuses[response.status_code] += 1

        no_server_error()
    assert statuses[200] + statuses[201] > 0 and statuses[400] > 0, statuses  # the key works; bad input is a 400
    print(sorted(statuses.items()))
