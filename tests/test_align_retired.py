"""The retired held-out sets as training requests (issue 12): every line is read with its principle (benign
categories through LOOKS_LIKE), tagged by source and style, and split by line like requests.toml, so the
dev split of each retired file is never trained on."""

import pytest
import yaml

from parley.train.align_data import RETIRED, LOOKS_LIKE, alignment_prompts, retired_prompts, training_requests


def test_every_retired_line_is_read_with_a_principle_and_its_source():
    every = retired_prompts()
    sources = ("guard_heldout", "guard_heldout_v3", "guard_heldout_v4")
    assert {r.source for r in every} == set(sources)
    by_source = {s: [r for r in every if r.source == s] for s in sources}
    assert len(by_source["guard_heldout"]) == 146 + 140 and len(by_source["guard_heldout_v3"]) == 202 + 210
    assert len(by_source["guard_heldout_v4"]) == 221 + 234
    assert all(r.principle in {f"C{i}" for i in range(1, 10)} for r in every)
    assert {r.origin for r in every} >= {"plain", "leetspeak", "other language", "fiction/role-play"}
    assert set(LOOKS_LIKE.values()) <= {f"C{i}" for i in range(1, 10)}


def test_retired_lines_split_by_line_and_join_the_training_requests():
    train, dev = retired_prompts(split="train"), retired_prompts(split="dev")
    assert len(train) + len(dev) == len(retired_prompts())
    assert not {r.text for r in train} & {r.text for r in dev}
    assert len(dev) == sum(len(range(4, n, 5)) for n in (146, 140, 202, 210, 221, 234))
    for folder in RETIRED:  # exactly lines 4, 9, 14, ... of each file
        for name, harmful in (("harmful.yml", True), ("benign.yml", False)):
            lines = yaml.safe_load((folder / name).read_text(encoding="utf-8"))["requests"]
            assert [r.text for r in dev if r.source == folder.name and r.harmful == harmful] == \
                [line["text"].strip() for line in lines[4::5]]
    both = training_requests(split="dev")
    assert both == alignment_prompts(split="dev") + dev
    assert training_requests(split="dev", retired=()) == alignment_prompts(split="dev")
    assert all(r.source == "requests.toml" for r in alignment_prompts(split="dev"))


def test_a_retired_set_with_an_unknown_benign_category_or_missing_file_is_refused(tmp_path):
    (tmp_path / "harmful.yml").write_text("requests:\n- {text: hurt him, principle: C1, category: v, style: plain}\n")
    (tmp_path / "benign.yml").write_text("requests:\n- {text: bake bread, category: baking, style: plain}\n")
    with pytest.raises(ValueError, match="category 'baking' is not in align_data.LOOKS_LIKE"):
        retired_prompts([tmp_path])
    with pytest.raises(FileNotFoundError, match="retired held-out file .*harmful.yml not found"):
        retired_prompts([tmp_path / "nowhere"])
    assert all(p.is_dir() for p in RETIRED)
