import csv
from collections import Counter

import pytest

from clipid.data.sources import SourceError, read_hands11k, read_inshop, read_manifest

from conftest import HANDS_HEADER


def test_inshop_reads_partition_and_descriptions(inshop_root):
    records = read_inshop(inshop_root)
    assert len(records) == 6
    assert Counter(r.split for r in records) == {"train": 2, "query": 2, "gallery": 2}
    dress = records[0]
    assert dress.item_id == "id_00000002"
    assert dress.caption == "A flowing dress. Short sleeves."
    assert dress.attributes == "red women's dresses"
    shirt = [r for r in records if r.item_id == "id_00000011"][0]
    assert shirt.caption == ""  # no description for this item: cleaning fills it later
    assert shirt.attributes == "women's blouses shirts"


def test_inshop_count_mismatch_names_line_1(inshop_root):
    index = inshop_root / "Eval" / "list_eval_partition.txt"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(["7", *lines[1:]]) + "\n")
    with pytest.raises(SourceError, match=r"list_eval_partition.txt:1: announces 7 images but "
                                          r"lists 6"):
        read_inshop(inshop_root)


def test_inshop_bad_status_names_line(inshop_root):
    index = inshop_root / "Eval" / "list_eval_partition.txt"
    lines = index.read_text().splitlines()
    lines[4] = lines[4].replace("query", "val")
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"list_eval_partition.txt:5: evaluation_status 'val'"):
        read_inshop(inshop_root)


def test_inshop_bad_header(inshop_root):
    index = inshop_root / "Eval" / "list_eval_partition.txt"
    lines = index.read_text().splitlines()
    lines[1] = "image item status"
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=":2: expected header"):
        read_inshop(inshop_root)


def test_hands11k_protocol(hands_root):
    records = read_hands11k(hands_root, "dorsal_r", exclude_accessories=True, splits=5, seed=0)
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split != "train"]
    # ids are strings with leading zeros kept and stray whitespace dropped; sorted, first half train
    assert {r.item_id for r in train} == {"0000000", "0000002"}
    assert {r.item_id for r in test} == {"0000010", "0000011"}
    assert len(train) == 3 + 2  # subject 0000002 lost one image to accessories
    assert all(r.path.startswith("Hands/") for r in records)
    # palmar images are not in a dorsal_r data set
    assert "palmar" not in " ".join(r.caption for r in records)
    assert train[0].caption == ("a dorsal view of the right hand of a 27 year old man with fair "
                                "skin")
    draws = sorted({r.split_index for r in test})
    assert draws == [0, 1, 2, 3, 4]
    for d in draws:
        rows = [r for r in test if r.split_index == d]
        for subject in ("0000010", "0000011"):
            mine = [r for r in rows if r.item_id == subject]
            assert [r.split for r in mine].count("gallery") == 1
            assert [r.split for r in mine].count("query") == 2
    # the draws differ: some image is in the gallery in one draw and a query in another
    gallery_sets = {frozenset(r.path for r in test if r.split_index == d and r.split == "gallery")
                    for d in draws}
    assert len(gallery_sets) > 1


def test_hands11k_draws_are_seeded(hands_root):
    a = read_hands11k(hands_root, "dorsal_r", True, 4, seed=1)
    b = read_hands11k(hands_root, "dorsal_r", True, 4, seed=1)
    assert a == b


def test_hands11k_keeps_accessories_when_asked(hands_root):
    records = read_hands11k(hands_root, "dorsal_r", exclude_accessories=False, splits=1, seed=0)
    assert len([r for r in records if r.split == "train"]) == 6


def test_hands11k_other_aspect(hands_root):
    records = read_hands11k(hands_root, "palmar_l", True, splits=1, seed=0)
    assert len(records) == 4
    assert all("palmar view of the left hand" in r.caption for r in records)
    assert any("painted nails" in r.caption for r in records)


def test_hands11k_bad_aspect_names_line(hands_root):
    path = hands_root / "HandInfo.csv"
    rows = list(csv.reader(path.open()))
    rows[3][6] = "sideways"
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    with pytest.raises(SourceError, match=r"HandInfo.csv:4: aspectOfHand 'sideways'"):
        read_hands11k(hands_root, "dorsal_r", True, 1, 0)


def test_hands11k_missing_column(hands_root):
    path = hands_root / "HandInfo.csv"
    rows = list(csv.reader(path.open()))
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([r[:6] + r[7:] for r in rows])
    assert "aspectOfHand" not in HANDS_HEADER[:6] + HANDS_HEADER[7:]
    with pytest.raises(SourceError, match="missing column.*aspectOfHand"):
        read_hands11k(hands_root, "dorsal_r", True, 1, 0)


def test_manifest_reads_optional_columns(manifest_root):
    records = read_manifest(manifest_root / "manifest.csv")
    assert len(records) == 12
    assert records[0].item_id == "000"
    assert records[1].camera == 1
    assert "<b>Item</b>" in records[0].caption


def test_manifest_minimal_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image,item_id,split\na.png,7,train\n")
    (record,) = read_manifest(path)
    assert (record.camera, record.caption, record.attributes) == (-1, "", "")


@pytest.mark.parametrize("body, message", [
    ("image,item\na.png,1\n", r"m.csv:1: missing column\(s\) item_id, split"),
    ("image,item_id,split\na.png,1,val\n", r"m.csv:2: split 'val' is not one of"),
    ("image,item_id,split\na.png,,train\n", r"m.csv:2: empty image or item_id"),
    ("image,item_id,split,camera\na.png,1,train,left\n", r"m.csv:2: camera 'left'"),
    ("image,item_id,split\n", r"m.csv: no rows"),
])
def test_manifest_errors_name_file_and_line(tmp_path, body, message):
    path = tmp_path / "m.csv"
    path.write_text(body)
    with pytest.raises(SourceError, match=message):
        read_manifest(path)
