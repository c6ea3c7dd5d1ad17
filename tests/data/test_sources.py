import json
import os

import datasets
import pytest

from eora_ft.data import sources
from eora_ft.data.sources import load_records, read_text, resolve_path

DEV_REL = "eora_ft/assets/data/arc/ARC-Challenge/ARC-Challenge-Dev.jsonl"
WIKI_REL = "eora_ft/assets/data/wikitext2/wikitext-2-raw-v1.test.joined.txt"


def test_resolve_path_prefers_cwd_then_repo_root(tmp_path, monkeypatch, assets_dir):
    repo_root = assets_dir.parents[1]
    monkeypatch.chdir(repo_root)
    assert resolve_path(DEV_REL) == DEV_REL

    monkeypatch.chdir(tmp_path)
    assert resolve_path(DEV_REL) == str(repo_root / DEV_REL)
    (tmp_path / "local.jsonl").write_text("{}\n")
    assert resolve_path("local.jsonl") == "local.jsonl"
    assert resolve_path("allenai/ai2_arc") == "allenai/ai2_arc"


def test_load_records_local_jsonl_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = load_records(DEV_REL)
    assert isinstance(records, datasets.Dataset)
    assert len(records) == 299
    assert {"id", "question", "answerKey"} <= set(records.column_names)


def test_load_records_directory_and_json(tmp_path, assets_dir):
    both = load_records(str(assets_dir / "data" / "arc" / "ARC-Challenge"))
    assert len(both) == 299 + 1119

    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert load_records(str(path))["text"] == ["a", "b"]


def test_load_records_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []
    monkeypatch.setattr(sources.datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "ds")
    assert load_records("allenai/ai2_arc", split="validation", name="ARC-Challenge") == "ds"
    assert calls == [(("allenai/ai2_arc", "ARC-Challenge"), {"split": "validation"})]


@pytest.mark.parametrize("missing", ["./nope.jsonl", "/no/such/dir/data.json", "nope.jsonl", "a/b/c", "~/x.jsonl"])
def test_load_records_missing_local_path_is_clear(missing):
    with pytest.raises(FileNotFoundError) as err:
        load_records(missing)
    message = str(err.value)
    assert repr(missing) in message
    assert ".json/.jsonl" in message and "hub dataset id" in message


def test_read_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = read_text(WIKI_REL)
    assert text.lstrip("\n").startswith(" = Robert Boulter = ")
    assert "\r" not in text
    with pytest.raises(FileNotFoundError, match=r"'missing\.txt'.*a local UTF-8 text file"):
        read_text("missing.txt")
    assert not os.path.exists("missing.txt")
