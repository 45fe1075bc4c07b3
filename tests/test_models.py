import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipid.features import image_features, text_features
from clipid.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from clipid.models.factory import ModelLoadError, create_model, load_model

TINY = "clipid-vit-tiny"


@pytest.fixture(scope="module")
def tiny():
    return create_model(TINY, "", seed=0)


def test_random_init_is_seeded_and_logged(caplog):
    a = create_model(TINY, "", seed=3)
    b = create_model(TINY, "", seed=3)
    c = create_model(TINY, "", seed=4)
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.conv1.weight"], sc["visual.conv1.weight"])
    assert a.weights == "random"
    assert "RANDOM weights" in caplog.text


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weight_file_is_loaded(tmp_path, tiny, suffix):
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in tiny.model.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = create_model(TINY, str(path))
    assert loaded.weights == str(path)
    for key in ("visual.conv1.weight", "token_embedding.weight", "logit_scale"):
        assert torch.equal(loaded.model.state_dict()[key], state[key])


def test_pickled_code_in_pt_file_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(ModelLoadError, match="cannot load"):
        create_model(TINY, str(path))


def test_missing_weight_file(tmp_path):
    with pytest.raises(ModelLoadError, match="weight file .* not found"):
        create_model(TINY, str(tmp_path / "nope.safetensors"))


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ModelLoadError, match="'laion9000' is not a pretrained tag of RN50 "
                                             r"\(tags: openai"):
        create_model("RN50", "laion9000")


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'ViT-Q-99'"):
        create_model("ViT-Q-99", "")


def test_offline_tag_says_how_to_supply_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as err:
        create_model("RN50", "openai")
    assert "offline" in str(err.value) and "set model.pretrained to its path" in str(err.value)


def test_checkpoint_round_trip_and_sidecar(tmp_path, tiny):
    path = tmp_path / "stage2" / "model.safetensors"
    meta = {"architecture": TINY, "stage": "stage2", "parent": "pretrained",
            "params": {"train.lr": 1e-5}, "run_id": "abc"}
    save_checkpoint(tiny.model.state_dict(), path, meta)
    assert json.loads(path.with_suffix(".json").read_text())["stage"] == "stage2"
    state, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta
    reloaded = load_model(path)
    ref = tiny.model.state_dict()
    assert all(torch.equal(reloaded.model.state_dict()[k], ref[k]) for k in ref)
    assert reloaded.metadata["run_id"] == "abc"
    assert not list(path.parent.glob("*.tmp"))


def test_checkpoint_needs_sidecar_and_safetensors(tmp_path, tiny):
    path = tmp_path / "m.safetensors"
    save_checkpoint(tiny.model.state_dict(), path, {"architecture": TINY})
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="sidecar is missing"):
        load_checkpoint(path)
    pickled = tmp_path / "m.pt"
    torch.save(tiny.model.state_dict(), pickled)
    with pytest.raises(CheckpointError, match="no pickles"):
        load_checkpoint(pickled)


def test_image_features_are_unit_norm_and_flip_averaged(tmp_path, tiny):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    feats = image_features(tiny.model, paths, tiny.preprocess_val, batch_size=2)
    assert feats.shape == (5, 128)
    assert torch.allclose(feats.norm(dim=1), torch.ones(5), atol=1e-5)
    # batching does not change the result
    single = image_features(tiny.model, paths[:1], tiny.preprocess_val, batch_size=1)
    assert torch.allclose(single[0], feats[0], atol=1e-5)
    flipped = image_features(tiny.model, paths, tiny.preprocess_val, flip=True)
    with torch.no_grad():
        x = torch.stack([tiny.preprocess_val(Image.open(p).convert("RGB")) for p in paths])
        expected = tiny.model.encode_image(x) + tiny.model.encode_image(torch.flip(x, dims=[3]))
    assert torch.allclose(flipped, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)


def test_text_features(tiny):
    feats = text_features(tiny.model, tiny.tokenizer, ["a red shirt", "a blue dress", "x"],
                          batch_size=2)
    assert feats.shape == (3, 128)
    assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(feats[0], feats[1])
