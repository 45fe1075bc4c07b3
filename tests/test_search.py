"""Gallery search: the index backends against brute force, the index stage's files, and
``clipid search``'s output and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipid import cli
from clipid.config import FaissParams, Params, params_from_dict
from clipid.data.dataset import PreparedData
from clipid.errors import ClipidError
from clipid.models.checkpoint import save_checkpoint
from clipid.models.factory import create_model
from clipid.search.gallery import GalleryIndex, Hit, gallery_rows
from clipid.search.index import ExactIndex, FaissIndex, build_index, recall_against_exact
from clipid.search.query import SearchResult, embed_text, has_text_tower, score_decimals, search
from clipid.stages.clean_captions import clean_captions
from clipid.stages.index import index_stage
from clipid.stages.prepare import prepare
from clipid.workspace import Workspace

HERE = Workspace()  # the working directory, as the stages see it


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rows: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around ``clusters`` centres: the structure real embeddings have."""
    rng = np.random.default_rng(seed)
    centres = unit(clusters, dim, seed + 1)
    x = centres[rng.integers(clusters, size=rows)] + 0.3 * unit(rows, dim, seed + 2)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :k]


# ---------------------------------------------------------------------------------------------
# index backends

def test_exact_index_in_blocks_matches_a_full_sort():
    gallery, queries = unit(1000, 16, 0), unit(50, 16, 1)
    index = ExactIndex(gallery, block=128)  # the running top-k crosses 8 blocks
    scores, ids = index.search(queries, 10)
    assert np.array_equal(ids, brute_force(gallery, queries, 10))
    assert np.allclose(scores, np.take_along_axis(queries @ gallery.T, ids, 1), atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_exact_index_ranks_equal_scores_in_gallery_order_and_caps_k():
    gallery = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=np.float32)
    scores, ids = ExactIndex(gallery, block=2).search(np.array([[1, 0]], np.float32), 10)
    assert ids.tolist() == [[0, 2, 3, 1]]
    assert scores.shape == (1, 4)


def test_ivf_visiting_every_cell_is_exact():
    gallery, queries = clustered(4000, 32, 20, 0), unit(40, 32, 5)
    ivf = FaissIndex.build(gallery, FaissParams(type="ivf", nlist=16, nprobe=16))
    _, ids = ivf.search(queries, 10)
    assert np.array_equal(ids, brute_force(gallery, queries, 10))


@pytest.mark.parametrize("spec", [FaissParams(type="ivf", nlist=64, nprobe=8),
                                  FaissParams(type="hnsw", hnsw_m=16, ef_search=64)])
def test_faiss_agrees_with_exact_search_on_a_small_gallery(spec):
    gallery = clustered(5000, 32, 50, 1)
    index = build_index(gallery, "faiss", spec)
    assert len(index) == 5000
    recall = recall_against_exact(index, gallery, k=10, queries=300)
    assert recall >= 0.9, f"{spec.type} recall@10 {recall:.3f}"


def test_ivf_caps_its_cells_for_a_small_gallery():
    ivf = FaissIndex.build(clustered(200, 8, 4, 2), FaissParams(type="ivf", nlist=1024))
    assert ivf.index.nlist == 200 // 39
    assert ivf.index.nprobe == ivf.index.nlist


def test_queries_of_the_wrong_width_are_refused():
    with pytest.raises(ClipidError, match="8 dimensions, the index 16"):
        ExactIndex(unit(10, 16, 0)).search(unit(1, 8, 0), 3)


# ---------------------------------------------------------------------------------------------
# the index stage and the search command, on a tiny prepared data set and random tiny CLIP

MICRO = {"data": {"synthetic": {"items": 12, "views": 4, "image_size": 48}, "cache_size": 32,
                  "workers": 0},
         "search": {"model": {"image": "stage1", "text": "stage1"}}}


def micro_params() -> Params:
    return params_from_dict(MICRO)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A directory laid out like the repository after `dvc repro index`, with stage 1's model
    (the random tiny CLIP) as the search model."""
    root = tmp_path_factory.mktemp("search")
    params = micro_params()
    (root / "params.yaml").write_text(json.dumps(MICRO))  # what `clipid search` reads
    prepare(params, Workspace(root))
    clean_captions(params, Workspace(root))
    mp = pytest.MonkeyPatch()
    mp.setenv("DVC_ROOT", str(root))  # the index stage's MLflow run goes to this store
    mp.chdir(root)
    try:
        index_stage(params)  # in the working directory, as `dvc repro` runs it
    finally:
        mp.undo()
    return root


def test_the_index_stage_embeds_each_gallery_image_once(workspace):
    directory = Workspace(workspace).index_dir("stage1")
    info = json.loads((directory / "index.json").read_text())
    table = (directory / "gallery.csv").read_text().splitlines()
    embeddings = np.load(directory / "embeddings.npy")
    gallery = gallery_rows(PreparedData.load(Workspace(workspace).prepared, with_texts=False))
    assert info["images"] == len(gallery) == len(embeddings) == len(table) - 1
    assert info["backend"] == "exact" and info["model"] == "stage1"
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    metrics = json.loads(Workspace(workspace).index_metrics.read_text())
    assert metrics["stage1"]["images"] == len(gallery)


def test_a_gallery_image_query_leaves_itself_out_and_says_so(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    gallery = GalleryIndex.load(HERE.index_dir("stage1"))
    probe = gallery.table["image"].iloc[3]
    own = f"data/prepared/{probe}"  # as the index stage wrote it
    nearest = gallery.search(gallery.embeddings[3:4], 6)[0]
    assert nearest[0].image == own and nearest[0].score == pytest.approx(1.0, abs=1e-4)
    result = search(micro_params(), image=HERE.prepared / probe, top_k=5)
    assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5]
    assert result.excluded == own and own not in [h.image for h in result.hits]
    assert [h.image for h in result.hits] == [h.image for h in nearest[1:]]
    assert run_cli("--image", str(HERE.prepared / probe), "--top-k", "2") == 0
    assert f"(the query is the gallery image {own}: left out)" in capsys.readouterr().out


def test_scores_get_the_decimals_that_tell_neighbours_apart():
    assert score_decimals([0.953, 0.932, 0.886]) == 3
    assert score_decimals([0.99991, 0.99987, 0.99987, 0.5]) == 5  # equal ones need no more
    assert score_decimals([1.0, 1.0]) == 3


def test_rank_and_score_are_columns_apart():
    hits = [Hit(rank, score, "item", f"img{rank}.png")
            for rank, score in enumerate([0.99991, 0.99987, 0.9], start=1)]
    lines = cli.result_lines(SearchResult("image", "q.png", "stage4", "exact", hits))
    assert lines[1].split() == ["rank", "score", "identity", "image"]
    assert lines[2].split() == ["1", "0.99991", "item", "img1.png"]
    assert lines[4].split() == ["3", "0.90000", "item", "img3.png"]


def test_faiss_and_exact_galleries_rank_alike(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    exact = GalleryIndex.load(HERE.index_dir("stage1"))
    clip = create_model("clipid-vit-tiny", "", seed=0)
    data = PreparedData.load(HERE.prepared, with_texts=False)
    params = micro_params()
    faiss = GalleryIndex.build(clip, "stage1", data, params.eval, "faiss",
                               FaissParams(type="hnsw"))
    faiss.save(workspace / "faiss-index")
    reloaded = GalleryIndex.load(workspace / "faiss-index")
    assert reloaded.info["backend"] == "faiss" and (workspace / "faiss-index/faiss.index").exists()
    q = exact.embeddings[:5]
    for a, b in zip(exact.search(q, 5), reloaded.search(q, 5), strict=True):
        assert [h.image for h in a] == [h.image for h in b]


def run_cli(*args: str) -> int:
    return cli.main(["search", *args])


def test_search_command_prints_a_ranked_table_and_writes_the_grid(workspace, monkeypatch,
                                                                  capsys):
    monkeypatch.chdir(workspace)
    assert run_cli("--text", "a red striped shirt", "--top-k", "4", "--grid", "out/grid.png") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "text query 'a red striped shirt', model stage1, exact index"
    rows = [line.split() for line in lines[2:6]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(r[3]).is_file() for r in rows)
    with Image.open(workspace / "out" / "grid.png") as im:
        assert im.size == (128 + 10 + 5 * 128 + 10, 128 + 28)  # query + one row of 4 results

    assert run_cli("--text", "a red striped shirt", "--top-k", "3", "--json") == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["query"] == {"text": "a red striped shirt"}
    assert [r["rank"] for r in payload["results"]] == [1, 2, 3]
    assert [r["image"] for r in payload["results"]] == [r[3] for r in rows[:3]]


@pytest.mark.parametrize("args, message", [
    (["--image", "nope.png"], "--image nope.png: no such file"),
    (["--image", "empty.png"], "--image empty.png: zero-byte file"),
    (["--image", "notes.png"], "--image notes.png: not an image"),
    (["--text", "   "], "--text: the query text is empty"),
    (["--text", "shirt", "--top-k", "0"], "--top-k: 0 is not a positive number"),
])
def test_bad_queries_get_a_clear_error(workspace, monkeypatch, capsys, args, message):
    monkeypatch.chdir(workspace)
    (workspace / "empty.png").write_bytes(b"")
    (workspace / "notes.png").write_text("not a picture")
    assert run_cli(*args) == 2
    assert message in capsys.readouterr().err


def test_a_text_query_needs_a_text_tower():
    clip = create_model("clipid-vit-tiny", "", seed=0)
    assert has_text_tower(clip.model)

    class ImageOnly(torch.nn.Module):
        def __init__(self, visual: torch.nn.Module):
            super().__init__()
            self.visual = visual

        def encode_image(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)

    clip.model = ImageOnly(clip.model.visual)
    assert not has_text_tower(clip.model)
    with pytest.raises(ClipidError, match="stage4 model .* has no text tower"):
        embed_text(clip, "a shirt", "stage4")


def beside(workspace: Path, root: Path) -> Workspace:
    """A workspace at ``root`` that reads ``workspace``'s prepared data and has no models."""
    (root / "data").symlink_to(workspace / "data", target_is_directory=True)
    return Workspace(root)


def test_an_index_of_a_retrained_model_is_reported_stale(workspace, tmp_path, monkeypatch,
                                                         caplog):
    monkeypatch.chdir(workspace)
    other = beside(workspace, tmp_path)  # the same data, models of its own
    clip = create_model("clipid-vit-tiny", "", seed=0)
    checkpoint = other.weights("stage2")
    save_checkpoint(clip.model.state_dict(), checkpoint,
                    {"architecture": "clipid-vit-tiny", "run_id": "first"})
    params = params_from_dict({"search": {"model": {"image": "stage2", "text": "stage2"}}})
    index_stage(params, other)
    search(params, text="a shirt", top_k=1, workspace=other)
    assert "stale" not in caplog.text
    # Retrained: same architecture, a new sidecar (run id, losses, time).
    save_checkpoint(clip.model.state_dict(), checkpoint,
                    {"architecture": "clipid-vit-tiny", "run_id": "second"})
    search(params, text="a shirt", top_k=1, workspace=other)
    assert "stage2 index was built from other stage2 weights" in caplog.text


def test_a_model_without_an_index_is_embedded_on_the_fly(workspace, tmp_path, monkeypatch,
                                                         caplog):
    monkeypatch.chdir(workspace)
    params = micro_params()
    result = search(params, text="a shirt", top_k=3, workspace=beside(workspace, tmp_path))
    assert len(result.hits) == 3
    assert "no index for stage1" in caplog.text
