"""README's search example and docs/search_*.png come from the committed outputs (`make docs`)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from clipid.config import params_from_dict
from clipid.data.dataset import PreparedData
from clipid.stages.clean_captions import clean_captions
from clipid.stages.index import index_stage
from clipid.stages.prepare import prepare
from clipid.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
MICRO = {"data": {"synthetic": {"items": 12, "views": 4, "image_size": 48}, "cache_size": 32,
                  "workers": 0},
         "search": {"model": {"image": "stage1", "text": "stage1"}}}


def load_generator():
    spec = importlib.util.spec_from_file_location("search_examples",
                                                  REPO / "docs" / "search_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_examples_are_current() -> None:
    docs = load_generator()
    record_file = REPO / "docs" / "search_examples.json"
    assert record_file.is_file(), "no docs/search_examples.json: run `make docs` after repro"
    record = json.loads(record_file.read_text())
    current = docs.lock_hashes(REPO)
    assert current and record["sources"] == current, \
        "the index or the images changed since `make docs`: run it again"
    for name, sha in record["files"].items():
        assert hashlib.sha256((REPO / "docs" / name).read_bytes()).hexdigest() == sha, name
    assert docs.readme_block(record["image_output"]) in (REPO / "README.md").read_text()


def test_the_generator_writes_the_examples_of_a_workspace(tmp_path, monkeypatch) -> None:
    docs = load_generator()
    root = tmp_path / "ws"
    root.mkdir()
    params = params_from_dict(MICRO)
    (root / "params.yaml").write_text(json.dumps(MICRO))
    prepare(params, Workspace(root))
    clean_captions(params, Workspace(root))
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(root)
    index_stage(params)
    monkeypatch.chdir(tmp_path)
    query = PreparedData.load(Workspace(root).prepared, with_texts=False).rows("query")
    image = f"data/prepared/{query['image'].iloc[0]}"
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{docs.BEGIN}\nold\n{docs.END}\nafter\n")
    out = tmp_path / "docs"
    out.mkdir()
    record = docs.generate(root, out, readme, image_query=image)
    lines = record["image_output"].splitlines()
    assert lines[0] == f"image query '{image}', model stage1, exact index"
    assert lines[1].split() == ["rank", "score", "identity", "image"]
    assert [line.split()[0] for line in lines[2:2 + docs.TOP_K]] == ["1", "2", "3", "4", "5"]
    assert lines[-1] == "grid: search.png"  # the docs path is not the user's
    assert readme.read_text() == f"before\n{docs.readme_block(record['image_output'])}\nafter\n"
    first = {name: (out / name).read_bytes() for name in record["files"]}
    again = docs.generate(root, out, readme, image_query=image)
    assert again == record and {n: (out / n).read_bytes() for n in first} == first
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="no generated search example block"):
        docs.generate(root, out, plain, image_query=image)
