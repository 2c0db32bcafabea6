"""The trained second stage of retrieval (issue 17): the query map over the stored vectors, the
cross-encoder reranker fine-tuned with its encoder, `parley train reranker` on a real store, and
query rewriting by a (tiny, real) language model. Real MiniLM, real SQLite."""

import json

import numpy as np
import pytest
import torch
from pg import store_target  # noqa: F401 (a fixture)
from test_knowledge import store  # noqa: F401 (a fixture; `embedder` is conftest's)

from parley.engine.engine import Engine
from parley.pipeline.knowledge import KnowledgeConfig, KnowledgeStage, ingest, search
from parley.pipeline.query_map import QueryMap, QueryMapError, train_query_map
from parley.pipeline.rerank import Reranker, RerankerError, pair_features
from parley.pipeline.rewrite import QueryRewriter
from parley.store import Store
from parley.train.rerank import RerankTrainConfig, fine_tune, first_of, main, too_close

TOPICS = {  # twelve small pages, so that `parley train reranker` has chunks to write questions for
    f"page{i}.txt": f"{topic} The {word} module of this manual explains it in section {i}."
    for i, (topic, word) in enumerate([
        ("Rent is due on the first working day of each month.", "rent"),
        ("The boiler in the cellar is serviced every October.", "boiler"),
        ("Check the tyre pressure of the car once a month.", "tyres"),
        ("The garden shed is painted green every other spring.", "garden"),
        ("Bins are collected on Tuesday mornings before eight.", "bins"),
        ("The cat is fed twice a day, at seven and at six.", "cat"),
        ("Passwords are changed every ninety days by the admin.", "passwords"),
        ("The library closes at nine on weekdays and at five on Sundays.", "library"),
        ("Invoices are paid within thirty days of receipt.", "invoices"),
        ("The lawn is mowed every Saturday from May to September.", "lawn"),
        ("Backups of the server run nightly at two in the morning.", "backups"),
        ("The fire alarm is tested on the first Monday of the month.", "alarm"),
    ])
}


@pytest.fixture
def topics(store, embedder, tmp_path):  # noqa: F811
    user = store.add_user("ann").id
    for name, text in TOPICS.items():
        (tmp_path / name).write_text(text)
    ingest(store, embedder, user, [tmp_path / name for name in TOPICS])
    return user


def test_a_trained_query_map_moves_questions_to_their_answers():
    rng = np.random.default_rng(0)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    answers = unit(rng.normal(size=(200, 8)))
    turn = np.linalg.qr(rng.normal(size=(8, 8)))[0]  # questions are the answers turned away
    questions = unit(answers @ turn + 0.1 * rng.normal(size=(200, 8)))
    negatives = np.stack([answers[(np.arange(200) + j) % 200] for j in (1, 2, 3, 4, 5)], axis=1)
    qmap = train_query_map(questions[:150], answers[:150], negatives[:150], steps=150, lr=3e-2, anchor=0.0)
    before = first_of(questions[150:], answers[150:], negatives[150:])
    after = first_of(qmap(questions[150:]), answers[150:], negatives[150:])  # held-out questions
    assert before < 0.5 < 0.9 < after
    same = train_query_map(questions[:150], answers[:150], negatives[:150], steps=0)  # untrained: the identity
    assert np.allclose(same(questions), questions, atol=1e-6)


def test_query_map_in_search_saved_loaded_and_checked(store, embedder, topics, tmp_path):  # noqa: F811
    identity = QueryMap(torch.eye(embedder.dim))
    plain = search(store, embedder, topics, "when do I pay the rent?", 3)
    mapped = search(store, embedder, topics, "when do I pay the rent?", 3, query_map=identity)
    assert [c.chunk.chunk_id for c in plain] == [c.chunk.chunk_id for c in mapped]
    assert [c.cosine for c in plain] == [c.cosine for c in mapped]  # cosines stay unmapped
    swap = torch.eye(embedder.dim)[torch.randperm(embedder.dim, generator=torch.Generator().manual_seed(0))]
    QueryMap(swap).save(tmp_path / "map.safetensors")
    loaded = QueryMap.load(tmp_path / "map.safetensors")
    q = embedder(["when do I pay the rent?"])[0]
    assert np.allclose(loaded(q), q @ swap.numpy().T, atol=1e-6)
    stage = KnowledgeStage(embedder, KnowledgeConfig(query_map=str(tmp_path / "map.safetensors")))
    assert np.allclose(stage.query_map.weight, swap)
    with pytest.raises(QueryMapError, match="train one"):
        QueryMap.load(tmp_path / "missing.safetensors")
    with pytest.raises(QueryMapError, match="square"):
        QueryMap(torch.zeros(3, 4))
    with pytest.raises(QueryMapError, match="384-dimensional"):
        loaded(np.zeros(5, dtype=np.float32))


def test_train_reranker_writes_a_query_map_from_a_store(embedder, tmp_path, capsys):
    with Store(tmp_path / "kb.db") as kb:  # SQLite: `parley train reranker` reads the chunks by SQL
        user = kb.add_user("ann").id
        for name, text in TOPICS.items():
            (tmp_path / name).write_text(text)
        ingest(kb, embedder, user, [tmp_path / name for name in TOPICS])
        chunk_ids = [row[0] for row in kb.db.execute("SELECT id FROM chunks ORDER BY id")]
    lm = tmp_path / "lm.jsonl"
    lm.write_text("\n".join(json.dumps({"chunk_id": i, "q": q}) for i, q in zip(chunk_ids, [
        "When must I pay the rent?", "How often is the boiler looked at?", "Who feeds the pets?"])))
    measured = tmp_path / "measured.yml"
    measured.write_text("questions:\n  - q: How often is the boiler looked at?\n")
    cfg = RerankTrainConfig(db=str(tmp_path / "kb.db"), user="ann", out=str(tmp_path / "map.safetensors"), questions=12,
                            lm_questions=str(lm), exclude=[str(measured)], negatives=3, epochs=20)
    assert main(cfg) == 0
    out = capsys.readouterr().out
    assert "1 by the model" in out and "1 dropped as too close" in out  # the pets question shares no word
    assert QueryMap.load(tmp_path / "map.safetensors").dim == embedder.dim
    assert too_close("how often is the boiler looked at", [{"often", "boiler", "looked"}])
    head = RerankTrainConfig(db=str(tmp_path / "kb.db"), user="ann", out=str(tmp_path / "head.safetensors"),
                             questions=12, kind="head", negatives=2, epochs=5)
    assert main(head) == 0 and not Reranker.load(embedder, tmp_path / "head.safetensors").tuned
    with pytest.raises(ValueError, match="kind must be"):
        RerankTrainConfig(kind="forest")


def test_a_fine_tuned_cross_encoder_is_its_own_copy(embedder, tmp_path):
    texts = list(TOPICS.values())
    groups = [("when is the rent due?", texts[0:4], "template"), ("when is the boiler serviced?", texts[1:5], "lm")]
    before = {name: p.detach().clone() for name, p in embedder.named_parameters()}
    cfg = RerankTrainConfig(steps=1, batch=2, max_tokens=48, train_layers=2)
    reranker = fine_tune(embedder, groups, cfg, log=lambda s: None)
    assert reranker.embedder is not embedder and reranker.tuned
    assert all(torch.equal(p, before[name]) for name, p in embedder.named_parameters())  # retrieval's is untouched
    tuned = dict(reranker.embedder.named_parameters())
    changed = {name for name, p in before.items() if not torch.equal(tuned[name], p)}
    assert changed and all(name.startswith(("layers.4.", "layers.5.")) for name in changed)  # the top two alone
    reranker.save(tmp_path / "ce.safetensors")
    loaded = Reranker.load(embedder, tmp_path / "ce.safetensors", precision="fp32")
    assert loaded.tuned and loaded.max_tokens == 48
    question = "when is the rent due?"
    assert np.allclose(loaded.score(question, texts[:4]), reranker.score(question, texts[:4]), atol=1e-4)
    fast = Reranker.load(embedder, tmp_path / "ce.safetensors", precision="bf16")  # what "auto" picks on AMX
    own = fast.embedder  # bf16 on oneDNN throughout: it scores batches of long pairs (rerank.py)
    assert own.precision == "bf16" and own.linear_path == "torch"
    assert next(own.parameters()).dtype == torch.bfloat16
    assert np.allclose(fast.score(question, texts[:4]), loaded.score(question, texts[:4]), atol=3e-2)
    with pytest.raises(RerankerError, match="precision must be"):
        Reranker.load(embedder, tmp_path / "ce.safetensors", precision="int4")
    with pytest.raises(ValueError, match="train_layers"):
        RerankTrainConfig(train_layers=7)


def test_frozen_layers_change_no_feature(embedder):
    texts = list(TOPICS.values())[:3]
    full = pair_features(embedder, "when is the rent due?", texts)
    for frozen in (0, 4, 6):  # the lower layers run without gradients, to the same values
        assert torch.allclose(pair_features(embedder, "when is the rent due?", texts, frozen=frozen), full, atol=1e-6)


def test_the_rewriter_keeps_the_question_in_front(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    rewritten = QueryRewriter(Engine(model), tokenizer, max_tokens=6)(["when is the rent due?", "who feeds the cat?"])
    assert len(rewritten) == 2 and rewritten[0].startswith("when is the rent due?")
    assert rewritten[1].startswith("who feeds the cat?")
