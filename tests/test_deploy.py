"""Deployable models: the MLflow Model (pyfunc) of a stage, its registry versions and the
``champion`` alias, ``mlflow models serve``, and the ONNX export."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from clipid.config import params_from_dict
from clipid.deploy import CHAMPION, IMAGE_MODEL, TEXT_MODEL
from clipid.features import image_features, text_features
from clipid.models.checkpoint import file_sha256, save_checkpoint
from clipid.models.factory import ClipModel, create_model, load_model
from clipid.search.query import embed_image
from clipid.stage_registry import get_stage
from clipid.tracking import Tracker
from clipid.workspace import Workspace

from conftest import VENV_BIN, draw, png_header

TEXTS = ["a red striped shirt", "blue denim jeans with a long description of the fabric", "x"]


def client(store: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


def checkpoint(models: Path, stage: str, seed: int) -> Path:
    """A stage's checkpoint: random tiny weights (seeded) plus a head, as training writes it."""
    clip = create_model("clipid-vit-tiny", seed=seed)
    state = {**clip.model.state_dict(), "heads.classifier.weight": torch.ones(3, 128)}
    return save_checkpoint(state, models / stage / "model.safetensors",
                           {"architecture": "clipid-vit-tiny", "stage": stage})


def train_run(stage: str, weights: Path, log: bool = True) -> str:
    params = params_from_dict({"mlflow": {"log_checkpoints": log}})
    with Tracker(stage=f"train_{stage}", params=params, run_name=stage) as tracker:
        tracker.log_checkpoint(weights, 1.0)
        return tracker.run_id


def images(folder: Path) -> list[Path]:
    """Different sizes and modes: the pyfunc must decode them like the feature extractor."""
    return [draw(folder / "a.png", 1, (40, 30)), draw(folder / "b.jpg", 2, (64, 96)),
            draw(folder / "c.png", 3, (70, 70), mode="P")]


def reference(clip: ClipModel, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    return (image_features(clip.model, paths, clip.preprocess_val).numpy(),
            text_features(clip.model, clip.tokenizer, TEXTS).numpy())


def test_a_training_run_logs_one_registered_pyfunc_that_embeds_like_clipid_features(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pyfunc

    weights = checkpoint(store / "models", "stage3", seed=1)
    run_id = train_run("stage3", weights)
    mlflow_client = client(store)
    # The weights are in the store once: inside the MLflow Model, not as a loose checkpoint.
    artifacts = store / "mlruns" / run_id / "artifacts"
    assert sorted(p.name for p in (artifacts / "checkpoint").iterdir()) == ["model.json"]
    held = artifacts / "model" / "artifacts" / "clip" / "model.safetensors"
    assert file_sha256(held) == file_sha256(weights)
    assert len(list(artifacts.rglob("*.safetensors"))) == 1
    for name in (IMAGE_MODEL, TEXT_MODEL):
        (version,) = mlflow_client.search_model_versions(f"name = '{name}'")
        assert version.run_id == run_id and version.tags["clipid.stage"] == "stage3"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{IMAGE_MODEL}/1")
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["image", "text"]
    assert signature.outputs.inputs[0].shape == (-1, 128)
    paths = images(store / "images")
    want_images, want_texts = reference(load_model(weights), paths)
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    got = model.predict(pd.DataFrame({"image": encoded}))
    assert got.dtype == np.float32 and np.abs(got - want_images).max() <= 1e-5
    raw = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    assert np.abs(raw - want_images).max() <= 1e-5
    mime = model.predict(pd.DataFrame({"image": [base64.encodebytes(paths[0].read_bytes())]}))
    assert np.abs(mime - want_images[:1]).max() <= 1e-5
    got = model.predict(pd.DataFrame({"text": TEXTS}))
    assert np.abs(got - want_texts).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # One frame may mix both kinds; each row gets its own embedding, in order.
    mixed = model.predict(pd.DataFrame({"image": [encoded[0], None], "text": [None, TEXTS[1]]}))
    assert np.abs(mixed - np.stack([want_images[0], want_texts[1]])).max() <= 1e-5
    with pytest.raises(Exception, match="exactly one of 'image' and 'text'"):
        model.predict(pd.DataFrame({"image": [encoded[0]], "text": [TEXTS[0]]}))
    with pytest.raises(Exception, match="not a readable image"):
        model.predict(pd.DataFrame({"image": [base64.b64encode(b"not an image").decode()]}))
    # The limits of `clipid serve` and `clipid search --image`, through the same decoding.
    with pytest.raises(Exception, match="'image': the image has more than 50,000,000 pixels"):
        model.predict(pd.DataFrame({"image": [png_header(30_000, 30_000)]}))
    large = draw(store / "images" / "large.png", 4, (1500, 1100))
    want = embed_image(load_model(weights), large, max_pixels=50_000_000)
    assert np.abs(model.predict(pd.DataFrame({"image": [large.read_bytes()]})) - want).max() \
        <= 1e-5


def test_without_log_checkpoints_no_weights_and_no_versions(
        store: Path, capsys: pytest.CaptureFixture) -> None:
    from mlflow.exceptions import MlflowException

    from clipid.stages.register import register_stage

    run_id = train_run("stage2", checkpoint(store / "models", "stage2", seed=1), log=False)
    artifacts = store / "mlruns" / run_id / "artifacts"
    assert [p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file()] \
        == ["checkpoint/model.json"]
    with pytest.raises(MlflowException):
        client(store).get_registered_model(IMAGE_MODEL)
    write_metrics(store / "metrics", {"stage2": (0.3, 0.1)})
    moved = register_stage(params_from_dict({"mlflow": {"log_checkpoints": False}}), ["stage2"],
                           Workspace(store))
    assert moved == {IMAGE_MODEL: None, TEXT_MODEL: None}
    assert "log_checkpoints is false" in capsys.readouterr().out


def write_metrics(metrics: Path, figures: dict[str, tuple[float, float]]) -> None:
    metrics.mkdir(parents=True, exist_ok=True)
    for stage, (i2i, t2i) in figures.items():
        (metrics / f"{stage}.json").write_text(json.dumps(
            {"i2i": {"R1": 0.5, "mAP": i2i}, "t2i": {"R1": 0.1, "mAP": t2i}, "queries": 3}))


def test_the_champion_alias_moves_to_the_best_stage_of_the_pipeline(
        store: Path, capsys: pytest.CaptureFixture) -> None:
    from clipid.stages.register import register_stage

    workspace = Workspace(store)
    models, metrics = workspace.models, workspace.metrics
    params = params_from_dict({})
    runs = {stage: train_run(stage, checkpoint(models, stage, seed))
            for seed, stage in enumerate(("stage2", "stage3", "stage4"), start=1)}
    # Stage 1 (the pretrained model) competes too, with a run and versions of its own.
    with Tracker(stage=get_stage("stage1").dvc_stage, params=params, run_name="stage1") as tracker:
        tracker.log_model(create_model("clipid-vit-tiny", seed=params.train.seed), "stage1")
        runs["stage1"] = tracker.run_id
    stages = ["stage1", "stage2", "stage3", "stage4"]
    mlflow_client = client(store)

    def champion(name: str) -> str:
        return mlflow_client.get_model_version_by_alias(name, CHAMPION).run_id

    write_metrics(metrics, {"stage1": (0.1, 0.2), "stage2": (0.3, 0.1), "stage3": (0.5, 0.6),
                            "stage4": (0.7, 0.4)})
    out = workspace.register_metrics
    moved = register_stage(params, stages, workspace)
    assert champion(IMAGE_MODEL) == runs["stage4"] and champion(TEXT_MODEL) == runs["stage3"]
    assert moved == {IMAGE_MODEL: "3", TEXT_MODEL: "2"}  # stage1 logged its model last
    # The DVC output names stages and figures only: no version numbers, no run ids.
    assert json.loads(out.read_text()) == {IMAGE_MODEL: {"stage": "stage4", "i2i/mAP": 0.7},
                                           TEXT_MODEL: {"stage": "stage3", "t2i/mAP": 0.6}}
    assert "clipid-image@champion version 3: stage4" in capsys.readouterr().out

    write_metrics(metrics, {"stage1": (0.9, 0.8), "stage2": (0.3, 0.1), "stage3": (0.5, 0.6),
                            "stage4": (0.7, 0.4)})
    register_stage(params, stages, workspace)
    assert champion(IMAGE_MODEL) == runs["stage1"] and champion(TEXT_MODEL) == runs["stage1"]

    # A retrained stage is a new version; the alias follows the weights the pipeline holds.
    runs["stage4"] = train_run("stage4", checkpoint(models, "stage4", seed=7))
    write_metrics(metrics, {"stage1": (0.1, 0.2), "stage2": (0.3, 0.1), "stage3": (0.5, 0.6),
                            "stage4": (0.7, 0.4)})
    register_stage(params, stages, workspace)
    assert champion(IMAGE_MODEL) == runs["stage4"]
    assert mlflow_client.get_model_version_by_alias(IMAGE_MODEL, CHAMPION).version == 5


def test_an_unreachable_store_leaves_the_alias_and_says_so(
        store: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from clipid.stages.register import register_stage

    workspace = Workspace(store)
    write_metrics(workspace.metrics, {"stage2": (0.3, 0.1)})
    checkpoint(workspace.models, "stage2", seed=1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    moved = register_stage(params_from_dict({}), ["stage2"], workspace)
    assert moved == {IMAGE_MODEL: None, TEXT_MODEL: None}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    # A shared store (MLFLOW_TRACKING_URI) outside git: the champion policy's candidate alias.
    assert "could not be reached" in last and "'candidate-workspace' not moved" in last
    assert json.loads(workspace.register_metrics.read_text())[IMAGE_MODEL]["stage"] == "stage2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{url}: {error.code} {error.read().decode()}") from None


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"mlflow models serve exited: {server.stdout.read()}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1.0)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.mark.slow  # ~1 min: the server imports mlflow and loads the model
def test_mlflow_models_serve_answers_with_clipid_embeddings(store: Path) -> None:
    from clipid.stages.register import register_stage

    weights = checkpoint(store / "models", "stage4", seed=2)
    train_run("stage4", weights)
    write_metrics(store / "metrics", {"stage4": (0.7, 0.4)})
    register_stage(params_from_dict({}), ["stage4"], Workspace(store))
    port = free_port()
    # Offline: no index to install from, no proxy; env-manager local installs nothing anyway.
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "PIP_NO_INDEX": "1",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": "127.0.0.1,localhost"}
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{IMAGE_MODEL}@{CHAMPION}",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=store, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server)
        paths = images(store / "images")[:1]
        row = base64.b64encode(paths[0].read_bytes()).decode()
        url = f"http://127.0.0.1:{port}/invocations"
        image = post(url, {"dataframe_split": {"columns": ["image"], "data": [[row]]}})
        text = post(url, {"dataframe_split": {"columns": ["text"], "data": [[TEXTS[0]]]}})
        # Both kinds in one request: the absent value of a row is empty.
        mixed = post(url, {"dataframe_split": {"columns": ["image", "text"],
                                               "data": [[row, ""], ["", TEXTS[0]]]}})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    want_images, want_texts = reference(load_model(weights), paths)
    want = np.stack([want_images[0], want_texts[0]])
    got = np.asarray(image["predictions"] + text["predictions"], dtype=np.float32)
    assert got.shape == (2, 128) and np.abs(got - want).max() <= 1e-5
    assert np.abs(np.asarray(mixed["predictions"]) - want).max() <= 1e-5


def test_onnx_export_matches_torch_and_is_byte_deterministic(tmp_path: Path) -> None:
    import onnxruntime

    from clipid.deploy.onnx import ImageEncoder, TextEncoder
    from clipid.stages.export import export_stage

    workspace = Workspace(tmp_path)
    models = workspace.models
    weights = checkpoint(models, "stage3", seed=3)
    params = params_from_dict({"search": {"model": {"image": "stage3", "text": "stage3"}}})
    first = export_stage(params, workspace=workspace)
    assert [p.relative_to(models).as_posix() for p in first] == [
        "export/stage3/image.onnx", "export/stage3/text.onnx", "export/stage3/model.json"]
    again = export_stage(params, "stage3", tmp_path / "again", workspace)
    for a, b in zip(first, again, strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two exports"
    card = json.loads(first[2].read_text())
    assert card["preprocess"]["size"] == [64, 64] and card["preprocess"]["interpolation"]
    assert card["tokenizer"]["context_length"] == 32 and card["embed_dim"] == 128

    clip = load_model(weights)
    batch = torch.stack([clip.preprocess_val(Image.open(p).convert("RGB"))
                         for p in images(tmp_path / "images")])  # 3 rows: traced with 2
    tokens = clip.tokenizer(TEXTS)
    for path, encoder, inputs in [(first[0], ImageEncoder(clip.model), batch),
                                  (first[1], TextEncoder(clip.model), tokens)]:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (name,) = [i.name for i in session.get_inputs()]
        got = session.run(None, {name: inputs.numpy()})[0]
        with torch.no_grad():
            want = encoder.eval()(inputs).numpy()
        assert got.shape == want.shape == (3, 128)
        assert np.abs(got - want).max() <= 1e-4
        cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cosine.min() > 0.9999


def test_a_checkpoint_without_a_model_is_kept_as_a_file(store: Path) -> None:
    """CLIP-ReID's prompt stage checkpoints learnt prompts, not a model: no MLflow Model."""
    from mlflow.exceptions import MlflowException

    prompts = save_checkpoint({"ctx": torch.zeros(3, 4, 128)},
                              store / "models" / "clipreid_prompts" / "model.safetensors",
                              {"architecture": "clipid-vit-tiny"})
    run_id = train_run("clipreid_prompts", prompts)
    logged = sorted(a.path for a in client(store).list_artifacts(run_id, "checkpoint"))
    assert logged == ["checkpoint/model.json", "checkpoint/model.safetensors"]
    assert not (store / "mlruns" / run_id / "artifacts" / "model").exists()
    with pytest.raises(MlflowException):
        client(store).get_registered_model(IMAGE_MODEL)


def test_the_same_weights_in_another_run_reuse_their_version(store: Path) -> None:
    """A deterministic rebuild (or a stage DVC restored in another experiment) logs weights the
    registry holds already: its run is tagged with them, and no version is added."""
    weights = checkpoint(store / "models", "stage2", seed=3)
    first = train_run("stage2", weights)
    again = train_run("stage2", weights)
    mlflow = client(store)
    versions = mlflow.search_model_versions(f"name = '{IMAGE_MODEL}'")
    assert [v.run_id for v in versions] == [first]
    digest = file_sha256(weights)
    assert mlflow.get_run(again).data.tags["clipid.weights_sha256"] == digest
    assert not list((store / "mlruns").rglob(f"{again}/artifacts/model"))  # logged once
