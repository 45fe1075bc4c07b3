"""The fingerprint of data.root: what changes it, what does not, and that it covers what prepare
reads. The DVC behaviour it exists for is tested in tests/test_fingerprint_dvc.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from clipid.cli import main
from clipid.config import DataParams, params_from_dict
from clipid.data.fingerprint import SOURCE_FILES, fingerprint_json, source_files
from clipid.data.sources import SourceError
from clipid.stages.prepare import prepare
from clipid.workspace import Workspace
from test_person_sources import duke_root, make_msmt, market_root, msmt_root  # noqa: F401

from conftest import draw

LAYOUTS = {"manifest": "manifest_root", "hands11k": "hands_root", "inshop": "inshop_root",
           "market1501": "market_root", "dukemtmc": "duke_root", "msmt17": "msmt_root",
           "msmt17 V2": "msmt_v2_root"}


def data(source: str, root: Path | str, **more) -> DataParams:
    return params_from_dict({"data": {"source": source, "root": str(root), **more}}).data


@pytest.fixture
def msmt_v2_root(tmp_path: Path) -> Path:
    return make_msmt(tmp_path / "MSMT17_V2", "mask_train_v2", "mask_test_v2")


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request) -> tuple[str, Path]:
    """(source, root) of each real layout of the tests (conftest, test_person_sources)."""
    return request.param.split()[0], request.getfixturevalue(LAYOUTS[request.param])


def test_synthetic_fingerprint_is_constant_and_walks_nothing(monkeypatch, tmp_path):
    def no_walk(*args):
        raise AssertionError("the synthetic source must not walk anything")

    with monkeypatch.context() as patch:
        patch.setattr(os, "scandir", no_walk)
        texts = {fingerprint_json(data("synthetic", "", seed=seed, synthetic={"items": items}))
                 for seed in (0, 3) for items in (12, 240)}
    assert len(texts) == 1
    # The stage writes the same bytes on every run.
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("data:\n  seed: 5\n")
    written = []
    for _ in range(2):
        assert main(["fingerprint"]) == 0
        written.append((tmp_path / "data" / "fingerprint.json").read_bytes())
    assert written[0] == written[1] == texts.pop().encode()


def test_the_stage_stays_instant_with_a_pretrained_tag(tmp_path):
    # The whole-file checks import open_clip (and torch) for a tag: not on every repro.
    (tmp_path / "params.yaml").write_text("model:\n  name: ViT-B-16\n  pretrained: openai\n")
    code = ("import sys; from clipid.cli import main; assert main(['fingerprint']) == 0; "
            "print(sorted({'open_clip', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
    assert (tmp_path / "data" / "fingerprint.json").is_file()


def test_unchanged_data_gives_the_same_bytes_without_absolute_paths(layout, tmp_path):
    source, root = layout
    first = fingerprint_json(data(source, root))
    assert fingerprint_json(data(source, root)) == first
    assert str(root) not in first and str(tmp_path) not in first
    # A copy with the same names, sizes and mtimes elsewhere: the same fingerprint.
    copy = shutil.copytree(root, tmp_path / "elsewhere" / "copy", copy_function=shutil.copy2)
    assert fingerprint_json(data(source, copy)) == first


def test_order_on_disk_never_matters(layout, monkeypatch):
    source, root = layout
    first = fingerprint_json(data(source, root))
    real_scandir = os.scandir

    class Reversed:
        def __init__(self, path):
            with real_scandir(path) as it:
                self.entries = sorted(it, key=lambda e: e.name, reverse=True)

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(os, "scandir", Reversed)
    assert fingerprint_json(data(source, root)) == first


def _keep_mtime(path: Path, edit) -> None:
    """Edit ``path`` in place and restore its modification time: only content tells."""
    before = path.stat()
    edit(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _changes(root: Path, source: str) -> dict:
    """Edits of a copy of ``root`` that prepare would read differently."""
    image = sorted(p for p in root.rglob("*") if p.suffix in (".jpg", ".png"))[0]
    image = image.relative_to(root)

    def replace_image(copy: Path) -> None:
        target = copy / image
        mtime = target.stat().st_mtime_ns
        target.write_bytes(target.read_bytes()[::-1])  # same size
        os.utime(target, ns=(0, mtime + 1))

    changes = {"image added": lambda copy: draw((copy / image).parent / "new.png", 99),
               "image removed": lambda copy: (copy / image).unlink(),
               "image replaced": replace_image}
    index = source_files(data(source, root))[1].index
    if index:  # Market-1501 and DukeMTMC-reID have none: the file names say everything
        changes["index edited, same size and mtime"] = lambda copy: _keep_mtime(
            copy / index[0], lambda p: p.write_bytes(p.read_bytes().replace(b"1", b"2", 1)))
    return changes


def test_every_change_prepare_would_see_changes_the_fingerprint(layout, tmp_path):
    source, root = layout
    for path in root.rglob("*"):  # reading is not a change
        if path.is_file():
            path.read_bytes()
    assert fingerprint_json(data(source, root)) == fingerprint_json(data(source, root))
    changes = _changes(root, source)
    assert len(changes) == (3 if source in ("market1501", "dukemtmc") else 4)
    for i, (change, apply) in enumerate(changes.items()):
        copy = shutil.copytree(root, tmp_path / f"change{i}", copy_function=shutil.copy2)
        before = fingerprint_json(data(source, copy))
        apply(copy)
        assert fingerprint_json(data(source, copy)) != before, change


def test_files_outside_what_prepare_reads_are_ignored(inshop_root):
    before = fingerprint_json(data("inshop", inshop_root))
    (inshop_root / "README.txt").write_text("notes")
    draw(inshop_root / "img_highres" / "x.jpg", 1)
    draw(inshop_root / "img" / ".thumbs" / "x.jpg", 2)
    (inshop_root / "img" / ".DS_Store").write_bytes(b"finder")
    assert fingerprint_json(data("inshop", inshop_root)) == before


def test_an_index_file_that_appears_changes_the_fingerprint(inshop_root):
    (inshop_root / "Anno" / "list_description_inshop.json").rename(inshop_root / "saved.json")
    before = json.loads(fingerprint_json(data("inshop", inshop_root)))
    assert before["index"]["Anno/list_description_inshop.json"] is None
    (inshop_root / "saved.json").rename(inshop_root / "list_description_inshop.json")
    after = json.loads(fingerprint_json(data("inshop", inshop_root)))
    assert after["index"]["list_description_inshop.json"] is not None
    assert after["images"] == before["images"]


def test_manifest_root_may_name_the_csv(manifest_root):
    csv = manifest_root / "manifest.csv"
    named = manifest_root / "list.csv"
    csv.rename(named)
    found = json.loads(fingerprint_json(data("manifest", named)))
    assert list(found["index"]) == ["list.csv"] and found["index"]["list.csv"] is not None
    # The CSV is hashed as the index, not listed among the images.
    assert found["images"]["files"] == len(list((manifest_root / "pics").iterdir()))


def test_symlinked_folders_are_followed_but_never_in_a_loop(hands_root):
    before = json.loads(fingerprint_json(data("hands11k", hands_root)))
    (hands_root / "Hands" / "loop").symlink_to(hands_root / "Hands", target_is_directory=True)
    assert json.loads(fingerprint_json(data("hands11k", hands_root))) == before
    moved = hands_root.parent / "hand_images"
    (hands_root / "Hands").rename(moved)
    (hands_root / "Hands").symlink_to(moved, target_is_directory=True)
    assert json.loads(fingerprint_json(data("hands11k", hands_root))) == before


def test_missing_root_is_a_clear_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(SourceError, match=r"data.root: '.*nowhere' is not a directory"):
        fingerprint_json(data("inshop", tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("data:\n  source: hands11k\n  root: nowhere\n")
    assert main(["fingerprint"]) == 2
    assert "clipid fingerprint: error: data.root: 'nowhere'" in capsys.readouterr().err


def test_every_real_source_declares_its_files():
    sources = set(typing.get_args(typing.get_type_hints(DataParams)["source"]))
    assert sources - {"synthetic"} <= set(SOURCE_FILES)


# Paths opened while recording; an audit hook cannot be removed, so it stays installed, idle.
_OPENED: list[str] | None = None


def _record_opens(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)


def test_the_declared_files_cover_everything_prepare_opens(layout, tmp_path):
    global _OPENED
    source, root = layout
    params = params_from_dict({"data": {"source": source, "root": str(root), "workers": 0,
                                        "cache_size": 16, "splits": 2}})
    _OPENED = []
    try:
        prepare(params, Workspace(tmp_path))
        opened = {Path(p).resolve() for p in _OPENED}
    finally:
        _OPENED = None
    base, files = source_files(params.data)
    base = base.resolve()
    read = {p.relative_to(base).as_posix() for p in opened if p.is_relative_to(base)}
    assert read, "prepare opened nothing under the root: the hook recorded nothing"
    folders = tuple("" if f in ("", ".") else f.rstrip("/") + "/" for f in files.images)
    assert {p for p in read if p not in files.index and not p.startswith(folders)} == set()
