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


def test_root_may_be_the_manifest_file_itself(tmp_path, manifest_root):
    from clipid.data.fingerprint import fingerprint

    renamed = manifest_root / "mine.csv"
    (manifest_root / "manifest.csv").rename(renamed)
    params = params_from_dict({"data": {"source": "manifest", "root": str(renamed)}})
    assert set(fingerprint(params.data)["index"]) == {"mine.csv"}  # the file prepare reads
    summary, out = run(tmp_path, source="manifest", root=str(renamed))
    assert summary["train"]["images"] == 6


def test_symlinked_image_folder_inside_the_root_is_accepted(tmp_path, manifest_root):
    elsewhere = tmp_path / "big_disk" / "pics"
    elsewhere.parent.mkdir()
    (manifest_root / "pics").rename(elsewhere)
    (manifest_root / "pics").symlink_to(elsewhere, target_is_directory=True)
    append_rows(manifest_root / "manifest.csv", [
        {"image": str(elsewhere / "0.png"), "item_id": "000", "split": "train"},
        {"image": "pics/../../big_disk/pics/1.png", "item_id": "000", "split": "train"}])
    summary, out = run(tmp_path / "ws", source="manifest", root=str(manifest_root),
                       max_rejected_fraction=0.5)
    rejected = pd.read_csv(out / "rejected.csv", dtype=str)
    assert set(rejected["reason"]) == {"path escapes the data root"}  # the two names, only them
    assert len(rejected) == 2 and summary["rejected"] == 2
    assert summary["train"]["images"] == 6  # the twelve images behind the link are all used


def lose_images(manifest_root: Path, numbers: list[int]) -> None:
    for number in numbers:
        next((manifest_root / "pics").glob(f"{number}.*")).unlink()


def test_drop_empty_identities_drops_and_records(tmp_path, manifest_root):
    # item 002 (images 6-8: query 6, gallery 7, 8) loses its gallery: its query has no answer;
    # a new identity 099 has one image, which is missing.
    lose_images(manifest_root, [7, 8])
    append_rows(manifest_root / "manifest.csv",
                [{"image": "pics/lost.png", "item_id": "099", "split": "train"}])
    with pytest.raises(PrepareError, match="1 identity left with no usable image: 099"):
        run(tmp_path, source="manifest", root=str(manifest_root), max_rejected_fraction=0.5)
    summary, out = run(tmp_path, source="manifest", root=str(manifest_root),
                       max_rejected_fraction=0.5, drop_empty_identities=True)
    assert summary["dropped_identities"] == 2 and summary["dropped_draws"] == 1  # 002 and 099
    rejected = pd.read_csv(out / "rejected.csv", dtype=str, keep_default_na=False)
    why = {(r.source_image, r.item_id): r.reason for r in rejected.itertuples()}
    assert why["", "099"].startswith("identity dropped: no usable image left")
    assert why["", "002"].startswith("identity dropped: no usable image left")
    assert why["pics/6.png", "002"].startswith("draw dropped 0: the identity has no usable gallery")
    table = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert "002" not in set(table["item_id"]) and "099" not in set(table["item_id"])
    assert json.loads(Workspace(tmp_path).data_metrics.read_text())["dropped_draws"] == 1


def test_drop_empty_identities_drops_only_the_draws_that_lost_their_gallery(tmp_path, hands_root):
    from clipid.data.sources import read_hands11k

    records = read_hands11k(hands_root, "dorsal_r", True, 3, 0)
    gallery = next(r for r in records if r.split == "gallery" and r.split_index == 1)
    (hands_root / gallery.path).unlink()
    summary, out = run(tmp_path, source="hands11k", root=str(hands_root), splits=3,
                       max_rejected_fraction=0.5, drop_empty_identities=True)
    table = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    subject = table[(table["item_id"] == gallery.item_id) & (table["split"] != "train")]
    lost_draws = {d for d in ("0", "1", "2")
                  if not ((subject["split_index"] == d) & (subject["split"] == "gallery")).any()}
    assert "1" in lost_draws and not (subject["split_index"].isin(lost_draws)).any()
    assert summary["dropped_draws"] == len(lost_draws) and summary["dropped_identities"] == 0


def test_cache_smaller_than_the_model_input_warns_with_both_sizes(tmp_path, manifest_root, caplog):
    params = params_from_dict({"data": {"workers": 0, "cache_size": 80, "source": "manifest",
                                        "root": str(manifest_root)},
                               "model": {"name": "ViT-B-16"}})
    prepare(params, Workspace(tmp_path))
    assert "data.cache_size is 80 px but ViT-B-16 reads 224 px images" in caplog.text
    caplog.clear()
    run(tmp_path, source="manifest", root=str(manifest_root), cache_size=64)  # the tiny model's
    assert "upscaled" not in caplog.text
