"""Activation, input geometry, test feature and SIE (issue 23, model side), each against a plain
transcription of CLIP-ReID's published image tower (``_clipreid_model_reference.py``) on the
same random weights."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import CLIP
from open_clip.transformer import QuickGELU
from PIL import Image

from _clipreid_model_reference import reid_features, reid_resnet, reid_vit
from clipid.deploy.preprocessing import image_transform, model_card
from clipid.models import factory
from clipid.models.checkpoint import save_checkpoint
from clipid.models.factory import create_model, load_model
from clipid.models.geometry import ModelSpec, apply_geometry
from clipid.models.visual import (
    add_camera_embedding,
    embedding_dim,
    encode_image_parts,
    image_embedding,
    set_embedding,
)

TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
SIZE = (256, 128)   # CLIP-ReID's person input


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def _tiny_vit(seed: int = 0) -> CLIP:
    """ViT-B-16's geometry (224 pixels, 16-pixel patches: a 14 x 14 grid), 3 narrow blocks."""
    torch.manual_seed(seed)
    vision = {"layers": 3, "width": 64, "head_width": 32, "patch_size": 16, "image_size": 224}
    return CLIP(32, vision, TEXT, quick_gelu=True).eval()


def _tiny_resnet(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    vision = {"layers": [1, 2, 1, 1], "width": 16, "head_width": 64, "image_size": 224}
    model = CLIP(32, vision, TEXT, quick_gelu=True).eval()
    # CLIP's init zeroes every bn3 (the residual branches would add nothing): draw them all.
    for module in model.visual.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.normal_(module.bias, std=0.1)
            module.running_mean.normal_(std=0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def _visual_state(model: CLIP) -> dict[str, torch.Tensor]:
    return {k.removeprefix("visual."): v.clone() for k, v in model.state_dict().items()
            if k.startswith("visual.")}


def _images(n: int = 3, size: tuple[int, int] = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1))


def _assert_parts(model: CLIP, reference: torch.nn.Module, images: torch.Tensor,
                  cameras: torch.Tensor | None = None, cv_emb: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        parts = encode_image_parts(model, images, cameras)
        (last, cls, proj), concat = reid_features(reference, images, cv_emb)
        set_embedding(model, "concat")
        embedded = image_embedding(model, images, cameras)
    _close(parts.last_block_cls, last)
    _close(parts.cls, cls)
    _close(parts.proj, proj)
    _close(embedded, concat)
    assert embedding_dim(model) == concat.shape[1]


@pytest.mark.parametrize("stride", [0, 12])   # 0: 16 x 8 patches; 12: OLP's 21 x 10
def test_vit_at_256x128_matches_clipreid(stride: int) -> None:
    model = _tiny_vit()
    state = _visual_state(model)
    apply_geometry(model, ModelSpec(image_size=SIZE, patch_stride=stride))
    reference = reid_vit(state, SIZE, stride or 16, heads=2)
    grid = (16 * 8) if not stride else (21 * 10)
    assert model.visual.positional_embedding.shape[0] == grid + 1
    _assert_parts(model, reference, _images())
    with torch.no_grad():   # open_clip's own forward runs at the new geometry too
        _close(model.encode_image(_images()), reid_features(reference, _images())[0][2])


def test_vit_b16_geometry_matches_clipreid() -> None:
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", force_quick_gelu=True).eval()
    state = _visual_state(model)
    apply_geometry(model, ModelSpec(image_size=SIZE))
    reference = reid_vit(state, SIZE, 16, heads=12)
    _assert_parts(model, reference, _images(1))
    assert embedding_dim(model) == 768 + 512


def test_sie_matches_clipreid() -> None:
    model = _tiny_vit()
    add_camera_embedding(model, 6, 1.5, torch.Generator().manual_seed(2))
    state = _visual_state(model)
    embed = state.pop("sie_embed")
    assert embed.shape == (6, 64) and embed.abs().max() < 0.1 and embed.std() > 0.01
    apply_geometry(model, ModelSpec(image_size=SIZE, patch_stride=12))
    reference = reid_vit(state, SIZE, 12, heads=2)
    cameras = torch.tensor([0, 5, 2])
    _assert_parts(model, reference, _images(), cameras, cv_emb=1.5 * embed[cameras])
    with torch.no_grad():   # a camera changes the feature; -1 (unknown) adds nothing
        plain = encode_image_parts(model, _images()).cls
        shifted = encode_image_parts(model, _images(), cameras).cls
        unknown = encode_image_parts(model, _images(), torch.tensor([-1, -1, -1])).cls
    assert not torch.allclose(plain, shifted)
    torch.testing.assert_close(unknown, plain, atol=0, rtol=0)


def test_resnet_last_stride_and_attention_pool_match_clipreid() -> None:
    model = _tiny_resnet()
    state = _visual_state(model)
    apply_geometry(model, ModelSpec(image_size=SIZE, last_stride=1))
    reference = reid_resnet(state, SIZE, [1, 2, 1, 1], heads=8)
    assert model.visual.attnpool.positional_embedding.shape[0] == 16 * 8 + 1
    _assert_parts(model, reference, _images(2))


def test_rn50_concat_is_3072_wide() -> None:
    model = open_clip.create_model("RN50")
    set_embedding(model, "concat")
    assert embedding_dim(model) == 2048 + 1024


def test_default_spec_changes_nothing() -> None:
    torch.manual_seed(0)
    model = open_clip.create_model("clipid-vit-tiny").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dict(model.visual.preprocess_cfg)
    apply_geometry(model, ModelSpec())
    assert model.visual.preprocess_cfg == cfg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    images = _images(2, (64, 64))
    with torch.no_grad():
        torch.testing.assert_close(image_embedding(model, images), model.encode_image(images),
                                   atol=0, rtol=0)


def _fake_openai_tag(monkeypatch: pytest.MonkeyPatch, weights: str) -> None:
    """open_clip's real ``openai`` entry (ViT-B-16's, QuickGELU-marked), its download replaced
    by a local file, registered for the tiny architecture: no network, no 600 MB."""
    entry = {**open_clip.get_pretrained_cfg("ViT-B-16", "openai"), "file": weights}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "clipid-vit-tiny", {"openai": entry})


def test_openai_tag_builds_quickgelu_offline(tmp_path, monkeypatch) -> None:
    assert factory._tag_quick_gelu("ViT-B-16", "openai")     # open_clip's own mark
    torch.manual_seed(3)
    plain = open_clip.create_model("clipid-vit-tiny", force_quick_gelu=True).eval()
    torch.save(plain.state_dict(), tmp_path / "openai.pt")
    _fake_openai_tag(monkeypatch, str(tmp_path / "openai.pt"))

    clip = create_model("clipid-vit-tiny", "openai", spec=ModelSpec(quick_gelu=None))
    assert clip.spec.quick_gelu is True
    assert isinstance(clip.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    images = _images(2, (64, 64))
    with torch.no_grad():
        torch.testing.assert_close(image_embedding(clip.model, images),
                                   plain.encode_image(images), atol=0, rtol=0)
    # ... recorded in the sidecar, so the loader rebuilds the same activation.
    save_checkpoint(clip.model.state_dict(), tmp_path / "m.safetensors", clip.sidecar())
    loaded = load_model(tmp_path / "m.safetensors")
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(images), plain.encode_image(images),
                                   atol=0, rtol=0)


def test_quick_gelu_false_and_weight_files_keep_gelu(tmp_path, monkeypatch) -> None:
    torch.manual_seed(3)
    torch.save(open_clip.create_model("clipid-vit-tiny").state_dict(), tmp_path / "w.pt")
    _fake_openai_tag(monkeypatch, str(tmp_path / "w.pt"))
    with pytest.warns(UserWarning, match="QuickGELU mismatch"):   # the user's choice, warned
        forced = create_model("clipid-vit-tiny", "openai", spec=ModelSpec(quick_gelu=False))
    local = create_model("clipid-vit-tiny", str(tmp_path / "w.pt"), spec=ModelSpec(quick_gelu=None))
    for clip in (forced, local):
        assert clip.spec.quick_gelu is False
        assert isinstance(clip.model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_sidecar_rebuilds_geometry_embedding_cameras_and_preprocessing(tmp_path) -> None:
    spec = ModelSpec(image_size=(96, 48), patch_stride=6, mean=(0.5,) * 3, std=(0.5,) * 3,
                     embedding="concat")
    clip = create_model("clipid-vit-tiny", spec=spec)
    clip.add_cameras([3, 1, 1, 6], torch.Generator().manual_seed(0))
    assert clip.spec.sie_cameras == (1, 3, 6)
    save_checkpoint(clip.model.state_dict(), tmp_path / "m.safetensors", clip.sidecar())
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.spec == clip.spec

    photo = Image.new("RGB", (60, 140), (200, 30, 90))
    photo.paste((10, 220, 40), (0, 0, 60, 20))   # the top band a centre crop would cut off
    card = model_card(loaded.model, loaded.architecture, "stage2", has_text=True)
    assert card["embedding"] == "concat" and card["embed_dim"] == 192 + 128
    served = image_transform(card)(photo)
    assert served.shape == (3, 96, 48)   # exactly height x width, no crop
    torch.testing.assert_close(served, loaded.preprocess_val(photo), atol=0, rtol=0)
    torch.testing.assert_close(served, clip.preprocess_val(photo), atol=0, rtol=0)
    assert served[:, :4].mean() != served[:, -4:].mean()
    assert served.min() < -0.5   # mean/std 0.5: values in [-1, 1]

    batch = served.unsqueeze(0).repeat(2, 1, 1, 1)
    cameras = clip.spec.camera_indices([6, 2])
    assert cameras.tolist() == [2, -1]
    with torch.no_grad():
        torch.testing.assert_close(image_embedding(loaded.model, batch, cameras),
                                   image_embedding(clip.model, batch, cameras), atol=0, rtol=0)
