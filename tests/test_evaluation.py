"""clipid.evaluation.evaluate on a prepared data set: independent of the manifest's row order,
camera-aware from the manifest's ``camera`` column."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from clipid.config import params_from_dict
from clipid.data.dataset import PreparedData
from clipid.evaluation import evaluate
from clipid.metrics import ROC_GRID
from clipid.models.factory import create_model

from conftest import prepare_data

PARAMS = params_from_dict({
    "data": {"synthetic": {"items": 24, "views": 4, "image_size": 48}, "cache_size": 32,
             "workers": 0},
    "eval": {"batch_size": 32, "rerank_k1": 6, "rerank_k2": 3},
})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedData:
    return PreparedData.load(prepare_data(PARAMS, tmp_path_factory.mktemp("prepared")))


@pytest.fixture(scope="module")
def clip():
    return create_model(PARAMS.model.name, PARAMS.model.pretrained, seed=0)


def shuffled(data: PreparedData, seed: int) -> PreparedData:
    """The same manifest with its rows in another order."""
    order = np.random.default_rng(seed).permutation(len(data.table))
    return dataclasses.replace(data, table=data.table.iloc[order].reset_index(drop=True))


@pytest.mark.parametrize(("rerank", "aqe"), [(False, False), (True, False), (True, True)])
def test_every_metric_is_independent_of_the_manifest_row_order(prepared, clip, rerank, aqe):
    params = dataclasses.replace(PARAMS.eval, rerank=rerank, aqe=aqe, aqe_k=3)
    expected = evaluate(clip, prepared, params)
    assert {"i2i", "t2i"} <= set(expected.metrics)
    for seed in range(4):
        result = evaluate(clip, shuffled(prepared, seed), params)
        assert result.metrics == expected.metrics, f"permutation {seed}"
        np.testing.assert_array_equal(result.cmc, expected.cmc)
        np.testing.assert_array_equal(result.roc, expected.roc)
        assert result.examples == expected.examples


def test_one_name_per_quantity(prepared, clip):
    metrics = evaluate(clip, prepared, PARAMS.eval).metrics
    rates = {"TPR_at_FPR_1e-4", "TPR_at_FPR_1e-3", "TPR_at_FPR_1e-2", "EER"}
    expected = {"i2i": {"R1", "R5", "R10", "R20", "mAP", "mINP"} | rates,
                "t2i": {"R1", "R5", "R10", "R20", "mAP", "mINP"}}
    for block, names in expected.items():
        assert {k for k in metrics[block] if not k.endswith("_std")} == names, block
        assert set(metrics[block]) == names | {f"{k}_std" for k in names}, block


def test_ranks_and_verification_follow_the_params(prepared, clip, tmp_path):
    from clipid.evaluation import write_results

    params = dataclasses.replace(PARAMS.eval, ranks=[1, 10, 30], verification=False)
    result = evaluate(clip, prepared, params)
    assert [k for k in result.metrics["i2i"] if not k.endswith("_std")] == \
        ["R1", "R10", "R30", "mAP", "mINP"]
    assert [k for k in result.metrics["t2i"] if not k.endswith("_std")] == \
        ["R1", "R10", "R30", "mAP", "mINP"]
    paths = tmp_path / "m.json", tmp_path / "cmc.json"
    write_results(result, *paths, roc_path=tmp_path / "roc.json")
    assert json.loads((tmp_path / "roc.json").read_text()) == []  # DVC's plot file exists
    full = evaluate(clip, prepared, PARAMS.eval)
    write_results(full, *paths, roc_path=tmp_path / "roc.json")
    curve = json.loads((tmp_path / "roc.json").read_text())
    assert [p["fpr"] for p in curve] == list(ROC_GRID)
    tprs = [p["tpr"] for p in curve]
    assert tprs == sorted(tprs) and tprs[-1] == 1.0
    assert curve[ROC_GRID.index(1e-2)]["tpr"] == round(full.metrics["i2i"]["TPR_at_FPR_1e-2"], 6)


def test_query_expansion_changes_the_image_figures_only(prepared, clip):
    plain = evaluate(clip, prepared, PARAMS.eval).metrics
    expanded = evaluate(clip, prepared, dataclasses.replace(PARAMS.eval, aqe=True)).metrics
    assert expanded["t2i"] == plain["t2i"] and expanded["i2i"] != plain["i2i"]


def with_cameras(data: PreparedData, query: dict[str, int], gallery: dict[str, int]
                 ) -> PreparedData:
    """``data`` with the cameras of some items' query and gallery rows replaced."""
    table = data.table.copy()
    for split, cameras in (("query", query), ("gallery", gallery)):
        for item, camera in cameras.items():
            table.loc[(table["split"] == split) & (table["item_id"] == item), "camera"] = camera
    return dataclasses.replace(data, table=table)


def test_camera_aware_evaluation_reads_the_manifest_camera_column(prepared, clip):
    table = prepared.table
    queries = table[table["split"] == "query"]
    item = queries["item_id"].iloc[0]
    camera = int(queries["camera"].iloc[0])
    # The synthetic set puts queries and gallery views on different cameras: nothing removed.
    base = evaluate(clip, prepared, PARAMS.eval).metrics["i2i"]
    unknown = prepared.table.assign(camera=-1)
    assert evaluate(clip, dataclasses.replace(prepared, table=unknown),
                    PARAMS.eval).metrics["i2i"] == base
    # All of one item's gallery images on its query's camera: removed, so that query has no
    # positive left and counts as if it were not there.
    same = evaluate(clip, with_cameras(prepared, {}, {item: camera}), PARAMS.eval)
    without = table[~((table["split"] == "query") & (table["item_id"] == item))]
    dropped = evaluate(clip, dataclasses.replace(prepared, table=without), PARAMS.eval)
    assert same.metrics["i2i"] == dropped.metrics["i2i"] != base
    # An unknown camera (-1) never matches: nothing removed.
    unknown_query = with_cameras(prepared, {item: -1}, {item: camera})
    assert evaluate(clip, unknown_query, PARAMS.eval).metrics["i2i"] == base


def test_evaluate_names_the_manifest_when_there_is_nothing_to_evaluate(prepared, clip):
    train_only = prepared.table[prepared.table["split"] == "train"]
    with pytest.raises(ValueError, match=str(Path("manifest.csv"))):
        evaluate(clip, dataclasses.replace(prepared, table=train_only), PARAMS.eval)
