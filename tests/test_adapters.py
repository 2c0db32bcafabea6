"""Many LoRA adapters in one batch (engine/adapters.py, kernels.c's lora_for): every row gets its
own request's adapter, and its tokens are those it gets served alone with that adapter, on each
path this CPU runs (AMX tiles, the AVX-512 C kernels, the int8 kernels, PyTorch's forward).
Adapters load from their folders, are evicted least recently used (never one in use), key the
prefix cache, and bad files are refused with a clear error."""

import copy
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
import torch
from test_tiles import CFG, tile_model

from parley.engine.adapters import AdapterBusy, AdapterError, Adapters
from parley.engine.engine import Engine
from parley.engine.fast import FastDecoder
from parley.engine.sampling import SamplingParams
from parley.model.lora import apply_lora, save_adapter
from parley.model.quant import quantize_model
from parley.model.transformer import ModelConfig, Transformer

# whole tiles (inputs multiples of 32, outputs of 16), so the AMX path runs where the CPU has it
base_model = tile_model


def write_adapter(folder, model: Transformer, seed: int, r: int = 4, targets=None, base: str = "tiny",
                  scale: float = 0.05, **meta) -> None:
    """A random adapter (B not zero, so it changes the answers) written as save_adapter writes one."""
    m = copy.deepcopy(model).float()
    kw = {"targets": targets} if targets else {}
    apply_lora(m, r=r, alpha=2 * r, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    save_adapter(folder, m, base=base, **meta)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = base_model()
    for i in range(3):
        write_adapter(root / f"user{i}", model, seed=i)
    write_adapter(root / "attn", model, seed=7, r=2, targets=("q_proj", "v_proj"))
    return root


PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42], [7] * 21, [100, 3, 250, 18, 19, 20, 60], [8, 9], [1, 2, 3, 4]]
NAMES = ["user0", "", "user1", "attn", "user2", "user0"]  # several adapters and none, one adapter twice


def serve(model, folder, kernels, prompts, names, max_batch=64, **kw):
    engine = Engine(model, kernels=kernels, max_batch=max_batch, page_size=8,
                    adapters=Adapters(model, folder, base="tiny"), **kw)
    params = [SamplingParams(max_tokens=10, adapter=n) for n in names]
    return [c.tokens for c in engine.generate(prompts, params)], engine


def paths():
    """The kernels settings this CPU runs (the tile path only with AMX)."""
    fast = FastDecoder.create(base_model())
    out = ["torch"] + (["avx512"] if fast is not None else []) + (["amx"] if fast is not None and fast.amx else [])
    return out


@pytest.mark.parametrize("kernels", ["amx", "avx512", "torch", "int8"])
def test_each_row_equals_that_request_alone_with_its_adapter(folder, kernels):
    if kernels == "int8":
        model = quantize_model(base_model(torch.float32), "q8")
        if FastDecoder.create(model) is None:
            pytest.skip("the C kernels cannot build here")
    else:
        if kernels not in paths():
            pytest.skip(f"this CPU does not run kernels={kernels}")
        # PyTorch's bf16 products on the CPU depend on the batch even without adapters: its
        # batch-invariant reference is fp32
        model = base_model(torch.float32 if kernels == "torch" else torch.bfloat16)
    engine_kernels = "auto" if kernels == "int8" else kernels
    together, engine = serve(model, folder, engine_kernels, PROMPTS, NAMES)
    if kernels == "int8":
        assert "int8" in engine.kernels_path
    alone = [serve(model, folder, engine_kernels, [p], [n], max_batch=1)[0][0] for p, n in zip(PROMPTS, NAMES)]
    assert together == alone
    base = serve(model, folder, engine_kernels, PROMPTS, [""] * len(PROMPTS))[0]
    assert together[1] == base[1]  # the row without an adapter is the base model's
    changed = [t != b for t, b, n in zip(together, base, NAMES) if n]
    assert sum(changed) >= 4, "the adapters should change most answers (else this test proves nothing)"


@pytest.mark.parametrize("kernels", ["amx", "avx512"])
def test_odd_and_large_ranks_keep_rows_equal_to_alone(tmp_path, kernels):
    """Ranks that are not whole tiles: odd (its last pair of u half zero), over 16 (A in two blocks
    of tile rows) and over 32 (u in two tiles), beside each other in one block of 16 rows."""
    if kernels not in paths():
        pytest.skip(f"this CPU does not run kernels={kernels}")
    model = base_model()
    for name, r in (("odd", 3), ("wide", 20), ("deep", 40)):
        write_adapter(tmp_path / name, model, seed=r, r=r)
    prompts, names = [[5, 17, 33], [40, 41, 42, 43] * 5, [100, 3, 250], [7, 8]], ["odd", "wide", "deep", ""]
    together, _ = serve(model, tmp_path, kernels, prompts, names)
    alone = [serve(model, tmp_path, kernels, [p], [n], max_batch=1)[0][0] for p, n in zip(prompts, names)]
    assert together == alone
    base = serve(model, tmp_path, kernels, prompts, [""] * len(prompts))[0]
    assert together[3] == base[3] and sum(t != b for t, b in zip(together[:3], base)) >= 2


def test_the_pytorch_paths_adapter_term_is_each_rows_own_in_bf16(folder):
    """In bf16 on the PyTorch path (kernels=torch) the base products are not batch-invariant
    (PyTorch's CPU GEMMs pick their blocking by the batch), so rows are equal to alone only in
    fp32 (the test above); what holds in bf16 too is that the adapter's term of a row has the
    same bits whatever rows come with it."""
    from parley.engine.adapters import TARGETS, low_rank_term

    model = base_model(torch.bfloat16)
    adapter = Adapters(model, folder, base="tiny").acquire("user1")
    x = torch.randn(13, CFG.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for target in (TARGETS.index("q_proj"), TARGETS.index("gate_proj")):
        batch = low_rank_term(adapter, 1, target, x)
        assert batch.abs().max() > 0
        for i in (0, 5, 12):
            assert torch.equal(low_rank_term(adapter, 1, target, x[i:i + 1])[0], batch[i])
        assert torch.equal(low_rank_term(adapter, 1, target, x[3:9]), batch[3:9])


def test_rows_match_the_lora_model_computed_by_pytorch(folder):
    """The adapter term is the one LoRALinear computes: fp32 weights, the PyTorch path, against a
    model with the adapter applied the training way (model/lora.py)."""
    from parley.model.lora import load_lora, read_adapter

    model = base_model(torch.float32)
    meta, state = read_adapter(folder / "user1")
    trained = copy.deepcopy(model)
    apply_lora(trained, r=meta["rank"], alpha=meta["alpha"])
    load_lora(trained, state)
    ids = torch.tensor([PROMPTS[0]])
    want = trained(ids)[0, -1].argmax().item()
    got, _ = serve(model, folder, "torch", [PROMPTS[0]], ["user1"])
    assert got[0][0] == want


def test_the_prefix_cache_is_not_shared_between_adapters(folder):
    model = base_model()
    engine = Engine(model, kernels="torch", page_size=8, adapters=Adapters(model, folder, base="tiny"))
    prompt = list(range(30, 60))  # three whole pages
    engine.generate([prompt], SamplingParams(max_tokens=2, adapter="user0"))
    engine.generate([prompt], SamplingParams(max_tokens=2, adapter="user1"))
    assert engine.stats()["reused_tokens"] == 0
    engine.generate([prompt], SamplingParams(max_tokens=2))
    assert engine.stats()["reused_tokens"] == 0
    engine.generate([prompt], SamplingParams(max_tokens=2, adapter="user1"))
    assert engine.stats()["reused_tokens"] == 24  # the same adapter again: its own pages


def test_eviction_is_least_recently_used_and_never_an_adapter_in_use(folder):
    model = base_model()
    one = Adapters(model, folder, base="tiny").acquire("user0").nbytes
    adapters = Adapters(model, folder, base="tiny", budget_bytes=2 * one)
    a0 = adapters.acquire("user0")
    adapters.release(adapters.acquire("user1"))
    adapters.release(adapters.acquire("user2"))  # evicts user1, the least recent not in use
    assert adapters.loaded == ["user0", "user2"] and adapters.evictions == 1
    a2 = adapters.acquire("user2")
    with pytest.raises(AdapterBusy, match="busy"):  # both in use: nothing may go
        adapters.acquire("user1")
    adapters.release(a0)
    adapters.acquire("user1")  # user0 is free now: it goes
    assert sorted(adapters.loaded) == ["user1", "user2"] and adapters.bytes_loaded <= 2 * one
    adapters.release(a2)


def test_requests_hold_their_adapter_until_they_end(folder):
    model = base_model()
    adapters = Adapters(model, folder, base="tiny")
    engine = Engine(model, kernels="torch", adapters=adapters)
    request = engine.submit([1, 2, 3], SamplingParams(max_tokens=3, adapter="user2"))
    [held] = [adapters._loaded[n] for n in adapters.loaded]
    assert held.users == 1
    list(request)
    assert held.users == 0


def test_bad_adapters_are_refused_with_a_clear_error(folder, tmp_path):
    model = base_model()
    engine = Engine(model, kernels="torch", adapters=Adapters(model, tmp_path, base="tiny"))
    with pytest.raises(AdapterError, match="no adapter 'nobody'"):
        engine.submit([1, 2], SamplingParams(adapter="nobody"))
    with pytest.raises(AdapterError, match="not valid"):
        engine.submit([1, 2], SamplingParams(adapter="../etc"))
    with pytest.raises(AdapterError, match="serves no adapters"):
        Engine(model, kernels="torch").submit([1, 2], SamplingParams(adapter="user0"))
    write_adapter(tmp_path / "other", model, seed=1, base="gemma3")
    with pytest.raises(AdapterError, match="trained on 'gemma3'"):
        engine.submit([1, 2], SamplingParams(adapter="other"))
    wide = Transformer(ModelConfig(**{**CFG.to_dict(), "hidden_size": 64, "intermediate_size": 128}))
    write_adapter(tmp_path / "wide", wide, seed=1)
    with pytest.raises(AdapterError, match="needs A"):
        engine.submit([1, 2], SamplingParams(adapter="wide"))
    write_adapter(tmp_path / "broken", model, seed=1)
    meta = json.loads((tmp_path / "broken" / "adapter.json").read_text())
    (tmp_path / "broken" / meta["weights"]).write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="damaged"):
        engine.submit([1, 2], SamplingParams(adapter="broken"))
    (tmp_path / "broken" / "adapter.json").write_text("{")
    with pytest.raises(AdapterError, match="not an adapter description"):
        engine.submit([1, 2], SamplingParams(adapter="broken"))
    assert engine.stats()["waiting"] == 0


# -- personalization: `parley learn user=NAME` (parley/learn/personal.py) on the tiny model

from test_learn import home  # noqa: E402,F401  (the tiny model "tiny", replay dialogs, users ann, bob, ...)

SIGN_OFF = " ~ann"
ANSWERS = {"how are you?": "Fine, how are you today?", "hello there": "Hello there, how are you today?",
           "numbers?": "Numbers 0123456789.", "where is Paris?": "Paris is in France.",
           "capital of France?": "The capital of France is Paris."}


def give_feedback(db: str, name: str, questions: list[str], sign: str) -> None:
    """`name` rates answers, editing each into the answer they want (with `sign` at its end)."""
    from parley.store import Store

    with Store(db) as store:
        user = store.get_user_by_name(name)
        for q in questions:
            conv = store.create_conversation(user.id)
            _, answer = store.add_exchange(user.id, conv.id, q, "whatever the model said")
            key = next(k for k in ANSWERS if k in q)
            store.add_feedback(user.id, answer.id, -1, edited_text=ANSWERS[key] + sign)


def sign_off_rate(engine, tokenizer, questions: list[str], adapter: str) -> float:
    """Of `questions` (unseen), the share where the served model, having written the answer the users
    want, goes on with the sign-off: its greedy next token after that answer is the sign-off's first.
    (The tiny model cannot be relied on to write the answer itself: on another CPU's rounding its
    free text differs, so the decision is read where the users' preferences differ.)"""
    first = tokenizer.encode(SIGN_OFF)[0]
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}])
               + tokenizer.encode(ANSWERS[next(k for k in ANSWERS if k in q)]) for q in questions]
    params = SamplingParams(max_tokens=1, adapter=adapter)
    nexts = [c.tokens[0] for c in engine.generate(prompts, [params] * len(prompts))]
    return sum(t == first for t in nexts) / len(nexts)


def test_a_users_adapter_answers_their_way_and_no_one_elses(home, capsys, one_thread):
    from parley.cli import main as parley
    from parley.learn.personal import adapters_dir, data_dir, serving
    from parley.registry import Registry
    from parley.serve.main import users_main
    from parley.store import Store

    root, replay, db, _ = home
    asked = [f"{q} (asked {i})" if i else q for i in range(4) for q in ANSWERS]  # 20 questions each
    give_feedback(db, "ann", asked, SIGN_OFF)  # ann always signs her answers
    give_feedback(db, "bob", asked, "")  # bob wants the same answers, plainly
    common = ["tiny", "replay=" + str(replay), f"db={db}", "replay_ratio=0.25", "train.seq_len=64",
              "train.batch_size=8", "train.steps=120", "train.lr=0.01", "train.warmup_steps=5", "lora.rank=8"]
    for name in ("ann", "bob"):
        assert parley(["learn", *common, f"user={name}"]) == 0, capsys.readouterr().err
    with Store(db) as store:
        ann, bob = store.get_user_by_name("ann"), store.get_user_by_name("bob")
    registry = Registry(root)
    for user in (ann, bob):
        meta = json.loads((adapters_dir("tiny", root) / str(user.id) / "adapter.json").read_text())
        assert meta["base"] == "tiny" and meta["base_version"] == "v1" and meta["rank"] == 8
        decision = json.loads((data_dir("tiny", user.id, root) / "round-001" / "decision.json").read_text())
        assert decision["kept"] and decision["after"]["user"] < decision["before"]["user"]

    model, tokenizer, _ = registry.load("tiny", dtype=torch.float32)
    from parley.engine.config import EngineConfig

    engine = Engine.from_config(model, EngineConfig(dtype="float32"), adapters=serving("tiny", registry))
    unseen = ["how are you? (new)", "where is Paris? (new)", "numbers? (new)", "hello there (new)",
              "capital of France? (new)", "how are you? (again)"]
    rates = {who: sign_off_rate(engine, tokenizer, unseen, adapter)
             for who, adapter in (("ann", str(ann.id)), ("bob", str(bob.id)), ("base", ""))}
    with capsys.disabled():  # the figure README.md quotes
        print(f"\nsign-off rate on {len(unseen)} unseen questions: {rates}")
    assert rates["ann"] >= 0.8 and rates["bob"] == 0 and rates["base"] == 0, rates

    # opting out deletes her adapter and her training data; deleting bob deletes his
    users_main(["--db", db, "optout", "ann"], out=io.StringIO())
    users_main(["--db", db, "delete", "bob", "--yes"], out=io.StringIO())
    for user in (ann, bob):
        assert not (adapters_dir("tiny", root) / str(user.id)).exists()
        assert not data_dir("tiny", user.id, root).exists()
    assert parley(["learn", *common, "user=ann"]) == 2  # opted out: nothing of hers is trained on
    assert "opted out" in capsys.readouterr().err


CHROMIUM = Path("/usr/bin/chromium")


def turned_off_in_the_page(url: str, key: str) -> None:
    """In Chromium: the settings show the user's adapter, an answer says it answered, and the
    user turns personalization off (asked to confirm first)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page, errors = browser.new_page(), []
        page.set_default_timeout(30_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.evaluate(f"localStorage.setItem('parley.key', {json.dumps(key)})")
        page.goto(url + "/")
        page.get_by_label("Message", exact=True).fill("where is Paris?")
        page.get_by_label("Message", exact=True).press("Enter")
        expect(page.locator("#log .msg.assistant .meta")).to_have_text(
            re.compile(r"^Answered by tiny, imported \S+ with your own adapter through the Parley assistant$"))
        page.locator("#settings-box summary").click()
        expect(page.locator("#adapter")).to_contain_text("On: trained in round 1 on tiny v1 (rank 4); it answers")
        page.get_by_role("button", name="Turn personalization off").click()
        page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
        expect(page.locator("#adapter")).to_contain_text("it answers your messages")  # asked first: nothing changed
        page.get_by_role("button", name="Turn personalization off").click()
        page.get_by_role("dialog").get_by_role("button", name="Delete").click()
        expect(page.locator("#adapter")).to_have_text("Off: nothing you write is trained on, and you have no adapter.")
        expect(page.get_by_role("button", name="Turn personalization on")).to_be_visible()
        browser.close()
    assert not errors, errors


def test_a_user_opts_out_over_http_and_turns_stop_naming_their_adapter(home):
    import httpx

    from parley.engine.config import EngineConfig
    from parley.learn.personal import adapter_for, adapters_dir, data_dir, serving as adapters_of
    from parley.registry import Registry
    from parley.serve.app import create_app
    from parley.serve.settings import Settings
    from parley.store import Store
    from serving import serving

    root, _, db, keys = home
    registry = Registry(root)
    model, tokenizer, _ = registry.load("tiny", dtype=torch.float32)
    engine = Engine.from_config(model, EngineConfig(dtype="float32"), adapters=adapters_of("tiny", registry))
    with Store(db) as store:
        ann = store.get_user_by_name("ann")
        # strong enough to change the tiny model's greedy answers
        write_adapter(adapters_dir("tiny", root) / str(ann.id), model, seed=1, base="tiny", scale=1.0,
                      base_version="v1", round=1)
        (data_dir("tiny", ann.id, root) / "round-001").mkdir(parents=True)
        assert adapter_for(engine, store, ann.id) == str(ann.id)
        bob = store.get_user_by_name("bob")
        assert adapter_for(engine, store, bob.id) == ""  # no adapter: the base model
    chat, text = [{"role": "user", "content": "where is Paris?"}], "The capital of France"
    prompts = [tokenizer.encode_chat(chat), tokenizer.encode(text)]

    def expected(adapter: str) -> list[str]:  # what the engine says for the two prompts with or without ann's adapter
        params = SamplingParams(max_tokens=8, temperature=0.0, stop_ids=frozenset(tokenizer.stop_ids), adapter=adapter)
        return [tokenizer.decode(c.tokens) for c in engine.generate(prompts, [params] * 2)]

    hers, plain = expected(str(ann.id)), expected("")
    assert hers != plain  # her adapter changes what the model says, so the replies below tell which one answered

    def raw_replies(http) -> list[str]:  # the model itself (not the assistant), over both OpenAI routes
        said = [http.post("/v1/chat/completions", json={"model": "tiny", "messages": chat, "max_tokens": 8,
                                                        "temperature": 0}),
                http.post("/v1/completions", json={"model": "tiny", "prompt": text, "max_tokens": 8,
                                                   "temperature": 0})]
        assert [r.status_code for r in said] == [200, 200], [r.text for r in said]
        return [said[0].json()["choices"][0]["message"]["content"], said[1].json()["choices"][0]["text"]]

    settings = Settings(db=db, home=str(root), model="tiny", stages=["respond"], requests_per_minute=0)
    with serving(create_app(settings, engine=engine, tokenizer=tokenizer)) as url, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['ann']}"}) as http, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['bob']}"}) as bobs:
        assert raw_replies(http) == hers and raw_replies(bobs) == plain  # each user's own model, on both routes
        state = http.get("/api/me/personalization").json()
        assert state["on"] and state["serving"] and state["adapter"]["base"] == "tiny"
        said = http.post("/v1/chat/completions", json={"model": "parley", "messages": chat, "max_tokens": 4})
        assert said.json()["parley"]["adapter"] and not bobs.post("/v1/chat/completions", json={
            "model": "parley", "messages": chat, "max_tokens": 4}).json()["parley"]["adapter"]
        if CHROMIUM.exists() and importlib.util.find_spec("playwright"):
            turned_off_in_the_page(url, keys["ann"])
            assert http.get("/api/me/personalization").json()["on"] is False
        assert http.put("/api/me/personalization", json={"on": "maybe"}).status_code == 400
        state = http.put("/api/me/personalization", json={"on": False}).json()
        assert state == {"on": False, "adapter": None, "serving": False}
        assert raw_replies(http) == plain  # opted out: the base model answers her on both routes
    assert not (adapters_dir("tiny", root) / str(ann.id)).exists() and not data_dir("tiny", ann.id, root).exists()
    with Store(db) as store:
        assert adapter_for(engine, store, ann.id) == ""
        write_adapter(adapters_dir("tiny", root) / str(ann.id), model, seed=1, base="tiny")
        assert adapter_for(engine, store, ann.id) == ""  # opted out: even an adapter put back is not served
