"""Market-1501, DukeMTMC-reID and MSMT17 read from small trees in their real layouts."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clipid.config import params_from_dict
from clipid.data.dataset import PreparedData
from clipid.data.person import read_market_layout, read_msmt17
from clipid.data.sources import SourceError
from clipid.metrics import evaluate_rank
from clipid.workspace import Workspace

from conftest import draw, prepare_data

# (folder, file name): Market-1501's own naming, with its junk (-1) and distractor (0000) boxes.
MARKET_FILES = [
    ("bounding_box_train", "0002_c1s1_000451_03.jpg"),
    ("bounding_box_train", "0002_c2s1_000301_01.jpg"),
    ("bounding_box_train", "0007_c3s1_000151_01.jpg"),
    ("bounding_box_train", "0007_c6s1_002101_02.jpg"),
    ("query", "0010_c1s1_001301_00.jpg"),
    ("query", "0011_c2s1_004501_00.jpg"),
    ("bounding_box_test", "0010_c1s1_001401_02.jpg"),  # same person, same camera as its query
    ("bounding_box_test", "0010_c4s2_007801_01.jpg"),
    ("bounding_box_test", "0011_c5s3_012001_03.jpg"),
    ("bounding_box_test", "0000_c1s1_000000_01.jpg"),  # distractor
    ("bounding_box_test", "-1_c3s1_000201_05.jpg"),    # junk
]


def make_market(root: Path, files=MARKET_FILES) -> Path:
    for i, (folder, name) in enumerate(files):
        draw(root / folder / name, i, size=(32, 64))
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0")  # not an image: not read
    return root


@pytest.fixture
def market_root(tmp_path: Path) -> Path:
    return make_market(tmp_path / "Market-1501-v15.09.15")


@pytest.fixture
def duke_root(tmp_path: Path) -> Path:
    files = [("bounding_box_train", "0005_c2_f0046985.jpg"),
             ("bounding_box_train", "0005_c5_f0051781.jpg"),
             ("bounding_box_train", "0008_c7_f0063434.jpg"),
             ("bounding_box_train", "0008_c8_f0064520.jpg"),
             ("query", "0019_c1_f0102111.jpg"),
             ("bounding_box_test", "0019_c6_f0115460.jpg"),
             ("bounding_box_test", "0019_c1_f0102200.jpg"),
             ("bounding_box_test", "6660_c8_f0154732.jpg")]  # distractor identity of its own
    return make_market(tmp_path / "DukeMTMC-reID", files)


MSMT_LISTS = {
    "list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0",
                       "0000/0000_001_05_0303morning_0036_1.jpg 0",
                       "0001/0001_000_12_0303noon_0120_0.jpg 1"],
    "list_val.txt": ["0001/0001_004_15_0303afternoon_0301_2.jpg 1"],
    "list_query.txt": ["0000/0000_000_03_0303morning_0021_0.jpg 0",
                       "0001/0001_000_07_0303noon_1401_0.jpg 1"],
    "list_gallery.txt": ["0000/0000_002_03_0303morning_0410_1.jpg 0",
                         "0000/0000_006_09_0303afternoon_0802_2.jpg 0",
                         "0001/0001_003_14_0304morning_0010_1.jpg 1",
                         "0002/0002_000_02_0304noon_0015_0.jpg 2"],
}


def make_msmt(root: Path, train: str = "train", test: str = "test") -> Path:
    for name, lines in MSMT_LISTS.items():
        folder = train if name in ("list_train.txt", "list_val.txt") else test
        for i, line in enumerate(lines):
            draw(root / folder / line.split()[0], len(name) * 10 + i, size=(32, 64))
        (root / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def msmt_root(tmp_path: Path) -> Path:
    return make_msmt(tmp_path / "MSMT17_V1")


def used(records):
    return [r for r in records if not r.excluded]


def test_market_identities_cameras_splits(market_root):
    records = read_market_layout(market_root, "market1501")
    rows = {(r.split, r.item_id, r.camera) for r in used(records)}
    assert rows == {("train", "0002", 1), ("train", "0002", 2), ("train", "0007", 3),
                    ("train", "0007", 6), ("query", "0010", 1), ("query", "0011", 2),
                    ("gallery", "0010", 1), ("gallery", "0010", 4), ("gallery", "0011", 5),
                    ("gallery", "0000", 1)}  # the distractor stays in the gallery
    first = used(records)[0]
    assert first.path == "bounding_box_train/0002_c1s1_000451_03.jpg"
    assert (first.caption, first.attributes) == ("", "")  # captions.fallback fills them
    (junk,) = [r for r in records if r.excluded]
    assert junk.path == "bounding_box_test/-1_c3s1_000201_05.jpg" and junk.item_id == "-1"
    assert "junk" in junk.excluded and "Market-1501" in junk.excluded


def test_market_order_on_disk_and_id_spelling_change_nothing(tmp_path, market_root):
    # The same files written in reverse order, one identity spelt without its leading zeros.
    files = [(f, n.replace("0007_", "7_")) for f, n in reversed(MARKET_FILES)]
    other = read_market_layout(make_market(tmp_path / "copy", files), "market1501")
    ours = read_market_layout(market_root, "market1501")
    assert [(r.split, r.item_id, r.camera) for r in other] == \
        [(r.split, r.item_id, r.camera) for r in ours]


@pytest.mark.parametrize("name, message", [
    ("abc.jpg", "abc.jpg: the file name does not start with '<person>_c<camera>'"),
    ("-2_c1s1_000451_03.jpg", "the file name does not start with '<person>_c<camera>'"),
    ("0002_c7s1_000451_03.jpg", "camera 7 is not in 1..6 of Market-1501"),
])
def test_market_bad_file_name_is_named(market_root, name, message):
    draw(market_root / "query" / name, 99)
    with pytest.raises(SourceError, match=message):
        read_market_layout(market_root, "market1501")


def test_market_missing_folder(tmp_path):
    (tmp_path / "m" / "query").mkdir(parents=True)
    with pytest.raises(SourceError, match="no bounding_box_train/, bounding_box_test/ folder"):
        read_market_layout(tmp_path / "m", "market1501")


def test_duke_has_eight_cameras_and_the_same_layout(duke_root):
    records = read_market_layout(duke_root, "dukemtmc")
    assert not [r for r in records if r.excluded]
    assert {r.camera for r in records} == {1, 2, 5, 6, 7, 8}
    assert {r.item_id for r in records if r.split == "gallery"} == {"0019", "6660"}
    draw(duke_root / "query" / "0019_c9_f0102111.jpg", 7)
    with pytest.raises(SourceError, match="camera 9 is not in 1..8 of DukeMTMC-reID"):
        read_market_layout(duke_root, "dukemtmc")


def test_msmt17_lists_cameras_and_split_ids(msmt_root):
    records = read_msmt17(msmt_root)
    train = [r for r in records if r.split == "train"]
    assert len(train) == 4  # list_train.txt and list_val.txt together
    assert {r.item_id for r in train} == {"train/0000", "train/0001"}
    val = [r for r in train if r.path.endswith("0303afternoon_0301_2.jpg")][0]
    assert (val.path, val.camera) == ("train/0001/0001_004_15_0303afternoon_0301_2.jpg", 15)
    # Train and test persons are numbered from 0 each: they must not merge.
    assert {r.item_id for r in records if r.split == "query"} == {"test/0000", "test/0001"}
    gallery = {(r.item_id, r.camera) for r in records if r.split == "gallery"}
    assert gallery == {("test/0000", 3), ("test/0000", 9), ("test/0001", 14), ("test/0002", 2)}
    assert not [r for r in records if r.excluded]


def test_msmt17_order_of_list_lines_changes_nothing(tmp_path, msmt_root):
    before = read_msmt17(msmt_root)
    for name in MSMT_LISTS:
        lines = (msmt_root / name).read_text().splitlines()
        (msmt_root / name).write_text("\n".join(reversed(lines)) + "\n")
    assert read_msmt17(msmt_root) == before


def test_msmt17_v2_folders(tmp_path):
    records = read_msmt17(make_msmt(tmp_path / "MSMT17_V2", "mask_train_v2", "mask_test_v2"))
    assert records[0].path.startswith("mask_train_v2/0000/")
    assert {r.path.split("/")[0] for r in records if r.split != "train"} == {"mask_test_v2"}


@pytest.mark.parametrize("line, message", [
    ("0002/0002_000_02_0304noon_0015_0.jpg", r"list_gallery.txt:5: expected 'path pid'"),
    ("0002/0002_000_02_0304noon_0015_0.jpg two", r"list_gallery.txt:5: pid 'two'"),
    ("0002/0002_000_xx_0304noon_0015_0.jpg 2", r"list_gallery.txt:5: the camera \(third '_'"),
    ("0002/0002_000_16_0304noon_0015_0.jpg 2", r"list_gallery.txt:5: camera 16 is not in 1..15"),
    ("0000/0000_002_03_0303morning_0410_1.jpg 0",
     r"list_gallery.txt:5: 0000/0000_002_03_0303morning_0410_1.jpg is already listed at "
     r".*list_gallery.txt:1"),
])
def test_msmt17_bad_line_names_file_and_line(msmt_root, line, message):
    with (msmt_root / "list_gallery.txt").open("a") as fh:
        fh.write(line + "\n")
    with pytest.raises(SourceError, match=message):
        read_msmt17(msmt_root)


def test_msmt17_missing_parts(tmp_path, msmt_root):
    (msmt_root / "list_val.txt").unlink()
    with pytest.raises(SourceError, match="list_val.txt not found"):
        read_msmt17(msmt_root)
    root = make_msmt(tmp_path / "flat", "train", "images")
    with pytest.raises(SourceError, match="image folders train/ and test/ or mask_train_v2/"):
        read_msmt17(root)


def person_params(source: str, root: Path):
    return params_from_dict({"data": {"source": source, "root": str(root), "workers": 0,
                                      "cache_size": 24},
                             "captions": {"noun": "person"}})


@pytest.mark.parametrize("source, fixture, counts", [
    ("market1501", "market_root", {"train": (4, 2), "query": (2, 2), "gallery": (4, 3)}),
    ("dukemtmc", "duke_root", {"train": (4, 2), "query": (1, 1), "gallery": (3, 2)}),
    ("msmt17", "msmt_root", {"train": (4, 2), "query": (2, 2), "gallery": (4, 3)}),
])
def test_prepare_end_to_end(tmp_path, request, source, fixture, counts):
    root = request.getfixturevalue(fixture)
    prepared = prepare_data(person_params(source, root), tmp_path / "out")
    summary = json.loads(Workspace(tmp_path / "out").data_metrics.read_text())
    assert {s: (summary[s]["images"], summary[s]["identities"]) for s in counts} == counts
    assert summary["rejected"] == 0
    # Market's one junk image of 11 is excluded, not rejected: 9% does not trip the 5% limit.
    assert summary["excluded"] == (1 if source == "market1501" else 0)
    rejected = pd.read_csv(prepared / "rejected.csv", dtype=str)
    assert list(rejected["source_image"]) == \
        (["bounding_box_test/-1_c3s1_000201_05.jpg"] if source == "market1501" else [])
    table = pd.read_csv(prepared / "manifest.csv", dtype=str, keep_default_na=False)
    assert (table["camera"].astype(int) >= 1).all()
    texts = json.loads((prepared / "image_texts.json").read_text())
    assert set(texts.values()) == {"a photo of a person"}  # captions.fallback with the noun


def test_evaluation_drops_same_identity_same_camera_gallery_entries(tmp_path, market_root):
    """Query 0010 (camera 1) has two gallery matches: camera 1 (removed by the protocol) and
    camera 4; the distances rank the camera-1 image first."""
    data = PreparedData.load(prepare_data(person_params("market1501", market_root),
                                          tmp_path / "out"))
    q, g = data.rows("query"), data.rows("gallery")
    assert list(q["camera"]) == [1, 2]
    source = list(g["source_image"])
    dist = np.ones((len(q), len(g)), dtype=np.float32)
    dist[0, source.index("bounding_box_test/0010_c1s1_001401_02.jpg")] = 0.1
    dist[0, source.index("bounding_box_test/0000_c1s1_000000_01.jpg")] = 0.2
    dist[0, source.index("bounding_box_test/0010_c4s2_007801_01.jpg")] = 0.3
    dist[1, source.index("bounding_box_test/0011_c5s3_012001_03.jpg")] = 0.1
    q_ids, g_ids = q["item_id"].to_numpy(), g["item_id"].to_numpy()
    cmc, m_ap = evaluate_rank(dist, q_ids, g_ids, q["camera"].to_numpy(), g["camera"].to_numpy(),
                              max_rank=3)
    # The same-camera match is gone: query 0010's positive comes second, after the distractor.
    assert cmc[0] == pytest.approx(0.5) and m_ap == pytest.approx((0.5 + 1.0) / 2)
    cmc, m_ap = evaluate_rank(dist, q_ids, g_ids, max_rank=3)
    assert cmc[0] == pytest.approx(1.0)  # without cameras it would count
