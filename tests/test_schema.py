"""Schema-driven fuzzing of the HTTP server: schemathesis (pinned 4.32.5) reads the app's own
/openapi.json and sends every operation generated requests, valid and invalid, over a real
socket to uvicorn serving the tiny model, the real MiniLM embedder and a SQLite file.

Every response must not be a 5xx, must have a status and content type the schema documents
and match the documented body, and invalid input must never be accepted with a 2xx.
Examples are bounded per operation, so the module runs in well under a minute.

(schemathesis's own pytest plugin, `from_fixture(...).parametrize()`, sets a private pytest
attribute that pytest 9 no longer has; the operations' Hypothesis strategies are driven
directly instead.)
"""


import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks
from schemathesis.specs.openapi import checks as openapi_checks

from parley.pipeline.embed import Embedder
from parley.engine.config import EngineConfig
from parley.serve.app import Settings, create_app
from parley.store import Store
from serving import serving

STAGES = ["safety_in", "sentiment", "state", "respond", "safety_out"]
CHECKS = [checks.not_a_server_error, openapi_checks.status_code_conformance,
          openapi_checks.content_type_conformance, openapi_checks.response_schema_conformance,
          openapi_checks.negative_data_rejection]
EXAMPLES = 30  # per operation, valid and invalid mixed


@pytest.fixture(scope="module")
def site(tiny768_own_home, tmp_path_factory):
    """The served app over the tiny model with a 768-token context (room for the assistant's
    prompt), and an admin's key; its own copy of the registry, which an admin's fuzzed requests may
    change (promote a version)."""
    db = str(tmp_path_factory.mktemp("db") / "parley.db")
    with Store(db) as store:
        key = store.create_api_key(store.add_user("ann", role="admin").id)
    cfg = Settings(db=db, home=tiny768_own_home, model="tiny768", engine=EngineConfig(dtype="float32"), stages=STAGES,
                   max_tokens=8, max_upload_bytes=20_000, requests_per_minute=0)
    with serving(create_app(cfg, embedder=Embedder.load())) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            for text in ("Hello there, how are you?", "Remember that my sister is called Ana", "Hi again"):
                http.post("/v1/chat/completions", json={"model": "parley", "messages": [
                    {"role": "user", "content": text}]}).raise_for_status()
            http.post("/api/knowledge", files={"file": ("notes.txt", b"The rent is due on the first.")},
                      ).raise_for_status()
        yield url, key


def steer(case, model: str, ident: int):
    """Random model names and ids only ever reach the 404s: most valid cases name a served model
    and an id that exists, so generation, traces and feedback are fuzzed too."""
    if isinstance(case.body, dict) and "model" in case.body and model:
        case.body["model"] = model
    for name in case.path_parameters:
        if name.endswith("_id") and ident:
            case.path_parameters[name] = ident
    return case


def fuzz(operation, url: str, key: str) -> None:
    """EXAMPLES generated requests to one operation, each validated; raises on the first failure."""
    valid = st.builds(steer, operation.as_strategy(GenerationMode.POSITIVE),
                      st.sampled_from(["tiny768", "parley", "all-minilm-l6-v2", ""]), st.sampled_from([1, 2, 3, 0]))
    cases = st.one_of(valid, operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(cases)
    def check(case):
        case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {key}"}, checks=CHECKS, timeout=60)

    check()


def test_every_operation_answers_within_its_schema(site):
    url, key = site
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    # deletions last, so the other operations still find the conversations, turns and documents
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=lambda o: o.method == "delete")
    assert len(operations) >= 15  # every route is in the schema
    failures = []
    for operation in operations:
        try:
            fuzz(operation, url, key)
        except (Exception, BaseExceptionGroup) as e:  # report every operation's failures at once
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n\n".join(failures)


def test_sampling_values_below_float32_resolution_are_the_likeliest_token(site):
    """Found by the fuzzer: top_p=5e-324 rounded to 0 in the float32 sampler, which then
    filtered out every token (a 500); so small a temperature overflowed the same way."""
    url, key = site
    greedy = {"temperature": 0, "max_tokens": 4}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        def text(**sampling) -> str:
            reply = http.post("/v1/completions", json={"model": "tiny768", "prompt": "Hello", **sampling})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["text"]

        assert text(top_p=5e-324, max_tokens=4) == text(temperature=1e-40, max_tokens=4) == text(**greedy)
        reply = http.post("/v1/chat/completions", json={"model": "parley", "temperature": 1e-40, "top_p": 5e-324,
                                                         "messages": [{"role": "user", "content": "Hello"}]})
        assert reply.status_code == 200, reply.text


def test_an_upload_error_names_the_file_not_the_servers_folder(site):
    """Found by the fuzzer: the message named the server's temporary folder."""
    url, key = site
    reply = httpx.post(url + "/api/knowledge", headers={"Authorization": f"Bearer {key}"},
                       files={"file": ("photo.png", b"\x89PNG\r\n")}, timeout=60)
    assert reply.status_code == 400
    assert reply.json()["error"]["message"].startswith("photo.png: unsupported file type .png")
