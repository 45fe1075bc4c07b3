"""Models and weights as open_clip names them (``hf-hub:org/name``), and the offline machine:
one line at once, never a minute of retries."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipid import cli
from clipid.models import MODEL_CONFIG_DIR
from clipid.models.factory import ModelLoadError, create_model

from _browser import free_port

TINY = "clipid-vit-tiny"
COMMIT = "0" * 40


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    code = cli.main(["check-params", "--params", str(path)])
    return code, capsys.readouterr().err


def test_hf_hub_names_and_weights_pass_the_checks(tmp_path, capsys) -> None:
    assert check(tmp_path, "model:\n  name: hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K\n",
                 capsys)[0] == 0
    assert check(tmp_path, "model:\n  name: ViT-B-16\n  pretrained: "
                 "hf-hub:timm/vit_base_patch16_clip_224.openai\n", capsys)[0] == 0
    code, err = check(tmp_path, "model:\n  name: hf-hub:org/model\n  pretrained: openai\n",
                      capsys)
    assert code == 2 and err.count("\n") == 1 and "brings its own weights" in err


def test_did_you_mean_ignores_case(tmp_path, capsys) -> None:
    code, err = check(tmp_path, "model:\n  name: vit-b-16\n", capsys)
    assert code == 2 and "did you mean 'ViT-B-16'" in err


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty local hub cache, and a hub that refuses connections (a closed loopback port)."""
    import huggingface_hub.constants as hf

    port = free_port()  # free now, and nobody listens on it
    cache = tmp_path / "hub"
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    return cache


def cache_repo(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """Files as huggingface_hub's cache keeps them (refs/main -> snapshots/<commit>/)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        (folder / "snapshots" / COMMIT).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / COMMIT / name).write_bytes(data)


def tiny_weights(tmp_path: Path) -> tuple[bytes, dict]:
    state = create_model(TINY, "", seed=7).model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    return (tmp_path / "w.safetensors").read_bytes(), state


def test_uncached_weights_on_an_unreachable_hub_fail_at_once_in_one_line(hub_cache, caplog):
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        create_model("ViT-B-16", "openai")
    message = str(err.value)
    assert "\n" not in message and "the 'openai' weights of ViT-B-16" in message
    assert "cannot be reached" in message and "set model.pretrained to its path" in message
    assert "Retrying" not in caplog.text  # no request was made, so nothing was retried
    assert time.monotonic() - started < 20  # huggingface_hub's retries took about a minute


def test_offline_flag_fails_at_once_for_hub_weights_and_models(hub_cache, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="model.pretrained: the weights hf-hub:me/tiny are "
                                             "not in the local Hugging Face cache and this "
                                             "machine is offline: HF_HUB_OFFLINE is set"):
        create_model(TINY, "hf-hub:me/tiny")
    with pytest.raises(ModelLoadError, match="model.name: the config and weights of "
                                             "hf-hub:me/tiny are not in the local"):
        create_model("hf-hub:me/tiny")


def test_cached_hub_weights_load_without_the_hub(hub_cache, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    data, state = tiny_weights(tmp_path)
    cache_repo(hub_cache, "me/tiny", {"open_clip_model.safetensors": data})
    clip = create_model(TINY, "hf-hub:me/tiny")
    assert clip.weights == "hf-hub:me/tiny"
    loaded = clip.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert "Retrying" not in caplog.text and "Connection refused" not in caplog.text


def test_cached_hub_model_name_brings_config_and_weights(hub_cache, tmp_path):
    data, state = tiny_weights(tmp_path)
    config = json.loads((MODEL_CONFIG_DIR / f"{TINY}.json").read_text())
    cache_repo(hub_cache, "me/tiny-model", {
        "open_clip_model.safetensors": data,
        "open_clip_config.json": json.dumps({"model_cfg": config}).encode()})
    clip = create_model("hf-hub:me/tiny-model")
    assert clip.weights == "hf-hub:me/tiny-model"
    assert torch.equal(clip.model.state_dict()["logit_scale"], state["logit_scale"])
    assert all(torch.equal(clip.model.state_dict()[k], v) for k, v in state.items())
