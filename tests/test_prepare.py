import csv
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from clipid.config import params_from_dict
from clipid.stages.prepare import PrepareError, prepare
from clipid.workspace import Workspace


def run(tmp_path: Path, **data) -> tuple[dict, Path]:
    params = params_from_dict({"data": {"workers": 0, "cache_size": 24, **data}})
    workspace = Workspace(tmp_path)
    summary = prepare(params, workspace)
    return summary, workspace.prepared


def append_rows(manifest: Path, rows: list[dict]) -> None:
    with manifest.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "item_id", "split", "camera", "caption"])
        writer.writerows(rows)


def test_manifest_source_end_to_end(tmp_path, manifest_root):
    summary, out = run(tmp_path, source="manifest", root=str(manifest_root))
    table = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(table) == 12
    assert table["item_id"].iloc[0] == "000"  # leading zeros survive the CSV round trip
    for image in table["image"]:
        im = Image.open(out / image)
        assert im.mode == "RGB" and min(im.size) == 24  # every mode converted, resized once
    assert summary["train"] == {"images": 6, "identities": 2}
    assert summary["query"]["images"] + summary["gallery"]["images"] == 6
    assert summary["rejected"] == 0
    assert json.loads(Workspace(tmp_path).data_metrics.read_text()) == summary


def test_bad_images_are_recorded_not_dropped_silently(tmp_path, manifest_root):
    (manifest_root / "pics" / "zero.png").write_bytes(b"")
    (manifest_root / "pics" / "junk.png").write_text("junk")
    append_rows(manifest_root / "manifest.csv", [
        {"image": "pics/zero.png", "item_id": "000", "split": "train"},
        {"image": "pics/junk.png", "item_id": "001", "split": "train"},
        {"image": "pics/missing.png", "item_id": "001", "split": "train"},
        {"image": "../outside.png", "item_id": "001", "split": "train"},
    ])
    Image.new("RGB", (30, 30)).save(manifest_root.parent / "outside.png")
    summary, out = run(tmp_path, source="manifest", root=str(manifest_root),
                       max_rejected_fraction=0.5)
    rejected = pd.read_csv(out / "rejected.csv", dtype=str)
    reasons = dict(zip(rejected["source_image"], rejected["reason"], strict=True))
    assert reasons["pics/zero.png"] == "zero-byte file"
    assert reasons["pics/junk.png"].startswith("not an image")
    assert reasons["pics/missing.png"] == "missing file"
    assert reasons["../outside.png"] == "path escapes the data root"
    assert summary["rejected"] == 4
    table = pd.read_csv(out / "manifest.csv", dtype=str)
    assert len(table) == 12  # every usable row kept, every unusable one in rejected.csv
    assert not list(tmp_path.rglob("outside_png*"))  # the escaping image was never cached


def test_too_many_rejects_fail_with_counts(tmp_path, manifest_root):
    for i in range(3):
        (manifest_root / f"bad{i}.png").write_bytes(b"")
    append_rows(manifest_root / "manifest.csv",
                [{"image": f"bad{i}.png", "item_id": "000", "split": "train"} for i in range(3)])
    with pytest.raises(PrepareError, match=r"3 of 15 images rejected \(20.0%\), more than "
                                           r"data.max_rejected_fraction=5.0%: 3 zero-byte file"):
        run(tmp_path, source="manifest", root=str(manifest_root))
    assert Workspace(tmp_path).rejected.is_file()  # the record is there to read


def test_identity_with_no_usable_image_fails(tmp_path, manifest_root):
    (manifest_root / "lost.png").write_bytes(b"")
    append_rows(manifest_root / "manifest.csv",
                [{"image": "lost.png", "item_id": "099", "split": "train"}])
    with pytest.raises(PrepareError, match="1 identity left with no usable image: 099"):
        run(tmp_path, source="manifest", root=str(manifest_root), max_rejected_fraction=0.5)


def test_image_under_two_identities_fails(tmp_path, manifest_root):
    append_rows(manifest_root / "manifest.csv",
                [{"image": "pics/0.png", "item_id": "777", "split": "train"}])
    with pytest.raises(ValueError, match="listed under two identities"):
        run(tmp_path, source="manifest", root=str(manifest_root))


def test_inshop_source(tmp_path, inshop_root):
    summary, out = run(tmp_path, source="inshop", root=str(inshop_root))
    assert summary["query"] == {"images": 2, "identities": 2}
    table = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert "images/img/WOMEN/Dresses/id_00000002/01_1_front_jpg.png" in set(table["image"])


def test_hands11k_source_stores_each_image_once(tmp_path, hands_root):
    summary, out = run(tmp_path, source="hands11k", root=str(hands_root), splits=3)
    table = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    test = table[table["split"] != "train"]
    assert sorted(test["split_index"].unique()) == ["0", "1", "2"]
    assert len(list((out / "images").rglob("*.png"))) == table["image"].nunique() == 11
    assert summary["draws"] == 3
    assert summary["gallery"] == {"images": 2, "identities": 2}


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data.root: '/nonexistent' is not a directory"):
        run(tmp_path, source="inshop", root="/nonexistent")


def test_parallel_workers_give_identical_output(tmp_path, manifest_root):
    a = tmp_path / "a"
    b = tmp_path / "b"
    run(a, source="manifest", root=str(manifest_root))
    params = params_from_dict({"data": {"workers": 2, "cache_size": 24, "source": "manifest",
                                        "root": str(manifest_root)}})
    # force the pool even for a tiny data set
    import clipid.stages.prepare as stage

    stage_min = stage.POOL_MIN_IMAGES
    stage.POOL_MIN_IMAGES = 0
    try:
        prepare(params, Workspace(b))
    finally:
        stage.POOL_MIN_IMAGES = stage_min
    first, second = Workspace(a), Workspace(b)
    for image in first.images.rglob("*.png"):
        twin = second.images / image.relative_to(first.images)
        assert twin.read_bytes() == image.read_bytes()
    manifests = [ws.manifest.read_text() for ws in (first, second)]
    assert manifests[0] == manifests[1]
