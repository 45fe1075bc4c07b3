"""Tiny data sets written in the real formats, with the quirks real ones have."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image

# `make test`'s workers share the machine's cores: torch's threads (OpenMP, which spins while it
# waits) get the worker's share, in the worker and in every process it starts, rather than each
# worker taking every core (set before anything imports torch).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(_share))

# DVC and MLflow must never phone home from a test.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

VENV_BIN = Path(sys.executable).parent


def prepare_data(params, out: Path) -> Path:
    """``prepare`` then ``clean_captions`` of ``params`` into ``Workspace(out)``; returns its
    prepared data set (``out/data/prepared``) that training and evaluation tests read."""
    from clipid.stages.clean_captions import clean_captions
    from clipid.stages.prepare import prepare
    from clipid.workspace import Workspace

    workspace = Workspace(out)
    prepare(params, workspace)
    clean_captions(params, workspace)
    return workspace.prepared


def draw(path: Path, seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Path:
    """A small random image, saved in ``mode`` by suffix."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path



def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels in a few bytes: a decompression bomb's
    header (the rows never come: decoding it fails as truncated, after allocating the image)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                                0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))

@pytest.fixture
def inshop_root(tmp_path: Path) -> Path:
    """DeepFashion In-shop layout: 3 items, train/query/gallery, descriptions for two items."""
    root = tmp_path / "inshop"
    rows = [
        ("img/WOMEN/Dresses/id_00000002/01_1_front.jpg", "id_00000002", "train"),
        ("img/WOMEN/Dresses/id_00000002/01_2_side.jpg", "id_00000002", "train"),
        ("img/MEN/Denim/id_00000007/01_1_front.jpg", "id_00000007", "query"),
        ("img/MEN/Denim/id_00000007/01_2_side.jpg", "id_00000007", "gallery"),
        ("img/WOMEN/Blouses_Shirts/id_00000011/02_1_front.jpg", "id_00000011", "query"),
        ("img/WOMEN/Blouses_Shirts/id_00000011/02_3_back.jpg", "id_00000011", "gallery"),
    ]
    for i, (image, _, _) in enumerate(rows):
        draw(root / image, i, size=(64, 96))
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    # padded with runs of spaces, like the real file
    lines += [f"{image}   {item}  {status}" for image, item, status in rows]
    (root / "Eval").mkdir()
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    descriptions = [
        {"item": "id_00000002", "color": "Red",
         "description": ["A flowing dress.", "Short sleeves."]},
        {"item": "id_00000007", "color": "Blue", "description": ["Slim jeans."]},
    ]
    (root / "Anno").mkdir()
    (root / "Anno" / "list_description_inshop.json").write_text(json.dumps(descriptions))
    return root


HANDS_HEADER = ["id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand",
                "imageName", "irregularities"]


@pytest.fixture
def hands_root(tmp_path: Path) -> Path:
    """11k Hands layout: 4 subjects with string ids (leading zeros, a stray space), mixed aspects,
    one image with accessories."""
    root = tmp_path / "hands"
    rows = []
    n = 0
    for subject, age, gender in [("0000000", 27, "male"), ("0000002", 19, "female"),
                                 (" 0000010", 33, "male"), ("0000011", 45, "female")]:
        for k in range(3):
            n += 1
            name = f"Hand_{n:07d}.jpg"
            draw(root / "Hands" / name, n, size=(80, 60))
            rows.append([subject, age, gender, "fair", 1 if k == 2 and subject == "0000002" else 0,
                         0, "dorsal right", name, 0])
        n += 1
        name = f"Hand_{n:07d}.jpg"
        draw(root / "Hands" / name, n, size=(80, 60))
        rows.append([subject, age, gender, "dark", 0, 1, "palmar left", name, 0])
    with (root / "HandInfo.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HANDS_HEADER)
        writer.writerows(rows)
    return root


@pytest.fixture
def manifest_root(tmp_path: Path) -> Path:
    """A CSV manifest with cameras, captions and one image per quirky mode."""
    root = tmp_path / "manifest"
    rows = []
    modes = ["RGB", "CMYK", "P", "RGBA", "L", "RGB"]
    for i in range(12):
        item = f"{i // 3:03d}"  # leading zeros must survive
        split = "train" if i < 6 else ("query" if i % 3 == 0 else "gallery")
        suffix = ".jpg" if modes[i % len(modes)] in ("CMYK", "L") else ".png"
        image = f"pics/{i}{suffix}"
        draw(root / image, i, mode=modes[i % len(modes)])
        rows.append({"image": image, "item_id": item, "split": split, "camera": i % 2,
                     "caption": f"  <b>Item</b> {i} &amp; more  "})
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "item_id", "split", "camera", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return root


# `make test` runs the suite on pytest-xdist workers (-n 3 --dist loadscope) with the scheduler
# below: a worker takes a whole scope, which is a module (its module fixtures, a server, a
# browser, a trained model, start once), except where a module's tests share only session builds
# that every worker can read (`built_once`), which go one by one. The longest go first
# (--no-loadscope-reorder keeps this order): the team servers' module, the tests that need the
# micro rebuild and those that need the micro build (two workers build them at once), the
# modules with slow tests; the short ones fill in.
PER_TEST_MODULES = ("test_pipeline.py", "test_mlflow_view.py", "test_reproducible.py")
FIRST = ("team_server", "micro_rebuilt", "micro_built")  # fixtures of the longest tests


def xdist_scope(nodeid: str) -> str:
    module = nodeid.split("::")[0]
    return nodeid if module.rsplit("/", 1)[-1] in PER_TEST_MODULES else module


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadscope by :func:`xdist_scope`."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return Scopes(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    for item in items:
        if "team_server" in item.fixturenames and item.module.__name__ != "test_team":
            raise pytest.UsageError(f"{item.nodeid} uses the team servers (a session fixture "
                                    "that stops with its worker): move it to tests/test_team.py")

    def rank(item: pytest.Item) -> int:
        first = [f for f in FIRST if f in item.fixturenames]
        if first:
            return FIRST.index(first[0])
        return len(FIRST) + (item.module.__name__ not in slow_modules)

    items.sort(key=rank)  # stable: each module keeps its order


# MLflow stores for the tracking tests (test_tracking, test_tracking_spool, test_lineage,
# test_deploy).

@pytest.fixture(scope="session")
def blank_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow database: creating one takes ~2 s, copying it nothing."""
    path = tmp_path_factory.mktemp("blank") / "mlflow.db"
    client(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blank_db: Path) -> Path:
    shutil.copy(blank_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME",
                 "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def client(uri: str | Path):
    from mlflow import MlflowClient

    return MlflowClient(uri if isinstance(uri, str) else f"sqlite:///{uri / 'mlflow.db'}")


def git_commit(root: Path) -> str:
    """A git repository at ``root`` with one empty commit; its hash."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
                              cwd=root, check=True, capture_output=True, text=True).stdout
    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "x")
    return git("rev-parse", "HEAD").strip()


def workspace_over(prepared: Path, root: Path):
    """A ``Workspace(root)`` whose ``data/prepared`` is the (shared, read-only) ``prepared``."""
    from clipid.workspace import Workspace

    workspace = Workspace(root)
    if not workspace.prepared.exists():
        workspace.prepared.parent.mkdir(parents=True, exist_ok=True)
        # Suppressed: another process of a DDP test may have made it first.
        with contextlib.suppress(FileExistsError):
            workspace.prepared.symlink_to(prepared.resolve(), target_is_directory=True)
    return workspace


class Interrupt(Exception):
    """A stage killed mid-run (the resume tests)."""


def kill_in_second_epoch():
    """An ``on_log`` that raises at the first step of epoch 2, after epoch 1's state is saved."""
    seen = {"epochs": 0}

    def on_log(metrics: dict, step: int) -> None:
        if any(k.startswith("epoch/") for k in metrics):
            seen["epochs"] += 1
        elif seen["epochs"] == 1:
            raise Interrupt

    return on_log


# The micro pipeline of tests/test_pipeline.py built once per test run and shared by the
# pytest-xdist workers (test_pipeline, test_reproducible, test_mlflow_view): a test that changes
# a build copies it.

T = TypeVar("T")


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[Path], T], kind: type[T]) -> T:
    """``build(folder)`` run once per test run, whichever worker asks first; the others wait for
    it and read what it returned (a dataclass of paths, texts and numbers)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    folder, done = base / name, base / f"{name}.json"
    with FileLock(str(base / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
            folder.mkdir()
            done.write_text(json.dumps(asdict(build(folder)), default=str))
    values = json.loads(done.read_text())
    return kind(**{f.name: Path(values[f.name]) if f.type == "Path" else values[f.name]
                   for f in dataclass_fields(kind)})


@dataclass(frozen=True)
class MicroOrigin:
    path: Path


@pytest.fixture(scope="session")
def micro_origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare repository holding this project's pipeline with the micro params.yaml."""
    def build(base: Path) -> MicroOrigin:
        from test_pipeline import sh, write_micro_pipeline

        seed = write_micro_pipeline(base / "seed")
        for args in (["git", "init", "-q"], ["dvc", "init", "-q"],
                     ["dvc", "config", "core.analytics", "false"], ["git", "add", "-A"],
                     ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm",
                      "micro"]):
            sh(seed, *args)
        sh(base, "git", "clone", "-q", "--bare", str(seed), str(base / "origin.git"))
        return MicroOrigin(base / "origin.git")

    return built_once(tmp_path_factory, "micro-origin", build, MicroOrigin).path


@dataclass(frozen=True)
class MicroBuild:
    origin: Path   # a bare repository holding the micro pipeline (no dvc.lock)
    cache: Path    # the DVC cache `first` filled (its run-cache too)
    first: Path    # a clone of origin that ran `dvc repro` on an empty MLflow store, uncommitted
    out: str       # what that `dvc repro` printed


@pytest.fixture(scope="session")
def micro_built(micro_origin: Path, tmp_path_factory: pytest.TempPathFactory) -> MicroBuild:
    def build(base: Path) -> MicroBuild:
        from test_pipeline import sh

        first = micro_clone(micro_origin, base / "first", base / "shared-cache")
        with pytest.MonkeyPatch.context() as mp:  # its own store, whatever the developer's is
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            out = sh(first, "dvc", "repro", timeout=3600)
        return MicroBuild(micro_origin, base / "shared-cache", first, out)

    return built_once(tmp_path_factory, "micro", build, MicroBuild)


@dataclass(frozen=True)
class MicroRebuild:
    clone: Path             # a clone of the micro build's origin with a DVC cache of its own
    out: str                # its `dvc repro` (every stage trained again), the store out of reach
    store_while_down: bool  # whether its mlflow.db existed before the sync (it must not)
    spooled: int            # the runs its spool held before the sync
    sync: str               # what `clipid tracking sync` (into its own store) printed


@pytest.fixture(scope="session")
def micro_rebuilt(micro_origin: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> MicroRebuild:
    """The micro pipeline built again from scratch in another clone while the MLflow store is
    out of reach, then synced: the rebuild's bytes (test_reproducible) and the spool's replay
    (test_mlflow_view) are checked on the one build, which needs only the origin (so a worker
    builds it while another builds ``micro_built``)."""
    def build(base: Path) -> MicroRebuild:
        from test_pipeline import sh

        from _browser import free_port

        clone = micro_clone(micro_origin, base / "clone")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nobody listens
            out = sh(clone, "dvc", "repro", timeout=3600)
        spooled = len(list((clone / ".clipid" / "spool").glob("*.json")))
        store_while_down = (clone / "mlflow.db").exists()
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            synced = sh(clone, "clipid", "tracking", "sync")
        return MicroRebuild(clone, out, store_while_down, spooled, synced)

    return built_once(tmp_path_factory, "micro-rebuild", build, MicroRebuild)


def micro_clone(origin: Path, dest: Path, cache: Path | None = None) -> Path:
    """A clone of ``origin`` (sharing the DVC ``cache`` when given), with a git identity."""
    from test_pipeline import sh

    sh(origin.parent, "git", "clone", "-q", str(origin), str(dest))
    sh(dest, "git", "config", "user.email", "test@example.com")
    sh(dest, "git", "config", "user.name", "clipid test")
    if cache is not None:
        sh(dest, "dvc", "config", "--local", "cache.dir", str(cache))
    return dest


# The team's servers (tests/_servers.py; README: Team setup), for the tests marked `team`.

@dataclass(frozen=True)
class TeamServer:
    url: str  # MLFLOW_TRACKING_URI of `clipid server`
    database: str  # its backend store: postgresql://... of a throwaway cluster
    artifacts: Path  # its --artifacts-destination
    log: Path  # its output (uvicorn's access log: one line per request, with the status)


@pytest.fixture(scope="session")
def team_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamServer]:
    """PostgreSQL in a throwaway cluster and `clipid server` on it, started once per test run;
    skips, saying why, where PostgreSQL or the team extra is missing."""
    from _servers import postgres, tracking_server, why_no_postgres

    if why := why_no_postgres():
        pytest.skip(f"the team server needs PostgreSQL and psycopg: {why}")
    workdir = tmp_path_factory.mktemp("team-server")
    artifacts = workdir / "artifacts"
    with postgres() as database, tracking_server(database, str(artifacts), workdir) as url:
        yield TeamServer(url, database, artifacts, workdir / "mlflow-server.log")
