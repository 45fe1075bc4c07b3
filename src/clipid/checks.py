"""Checks of the parameters as a whole, run by ``clipid check-params`` and by every stage before it
reads any data.

:mod:`clipid.config` checks one key at a time (its type, its range, its allowed values); these
checks look at what keys name and how they fit together: the stage an ``init`` starts from, the
architecture, the weight file, batch sizes that the sampler and the processes can split. Each
failure is a :class:`~clipid.config.ConfigError` naming the file, the line and the key.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from pathlib import Path

from clipid.config import ConfigError, ModelParams, Params, load_params, param_lines
from clipid.stage_registry import (
    FORMER_PRETRAINED_NAMES,
    PRETRAINED,
    init_of,
    model_stages,
    stage_spec,
    trained_stages,
)

__all__ = ["PRETRAINED", "WEIGHT_SUFFIXES", "architectures", "check_params",
           "load_checked_params", "looks_like_weight_file", "stage_inits"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# clipid's own architectures (clipid.models registers this folder with open_clip).
CLIPID_MODEL_CONFIGS = Path(__file__).parent / "models" / "model_configs"


class _Where:
    """``params.yaml:12`` for a key written in the file, ``params.yaml`` for a default."""

    def __init__(self, source: str, lines: dict[str, int]):
        self.source, self.lines = source, lines

    def __call__(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.source}:{line}" if line else self.source


def load_checked_params(path: str | Path = "params.yaml") -> Params:
    """:func:`~clipid.config.load_params`, then :func:`check_params` with the file's lines."""
    params = load_params(path)
    check_params(params, str(path), param_lines(path))
    return params


def check_params(params: Params, source: str = "<params>",
                 lines: dict[str, int] | None = None) -> None:
    """Raise :class:`~clipid.config.ConfigError` on the first problem found."""
    where = _Where(source, lines or {})
    _check_inits(params, where)
    _check_search_models(params, where)
    _check_model(params, where)
    _check_geometry(params, where)
    _check_batches(params, where)
    _check_recipe(params, where)


def stage_inits(params: Params) -> dict[str, str]:
    """Training stage -> the stage whose model it starts from (``clipreid``'s prompts start
    from the same model as its image stage)."""
    return {stage: init_of(params, stage) for stage in trained_stages()}


def _check_inits(params: Params, where: _Where) -> None:
    inits = stage_inits(params)
    for stage, init in inits.items():
        if init != PRETRAINED and init not in inits:
            hint = _former_name(init)
            raise ConfigError(f"{where(f'{stage}.init')}: '{stage}.init' is '{init}', which names "
                              f"no stage{hint}; allowed: {PRETRAINED}, {', '.join(inits)}")
    for start in inits:
        chain = [start]
        while inits[chain[-1]] != PRETRAINED:
            nxt = inits[chain[-1]]
            if nxt in chain:
                cycle = chain[chain.index(nxt):]
                steps = ", ".join(f"{s}.init is {inits[s]}" for s in cycle)
                raise ConfigError(f"{where(f'{cycle[0]}.init')}: '{cycle[0]}.init' is in a cycle "
                                  f"of inits ({steps}); one stage of it must start from "
                                  f"'{PRETRAINED}' or from a stage outside it")
            chain.append(nxt)


def _former_name(name: str) -> str:
    """`` (the pretrained model is 'stage1')`` for a name Stage 1 had before."""
    return f" (the pretrained model is '{PRETRAINED}')" if name in FORMER_PRETRAINED_NAMES \
        else ""


def _check_search_models(params: Params, where: _Where) -> None:
    """``search.model.image``/``.text`` name stages with a model (the index embeds with it)."""
    allowed = model_stages()
    for kind in ("image", "text"):
        key = f"search.model.{kind}"
        name = getattr(params.search.model, kind)
        if name not in allowed:
            raise ConfigError(f"{where(key)}: '{key}' is '{name}', which names no stage with a "
                              f"model{_former_name(name)}; allowed: {', '.join(allowed)}")


def looks_like_weight_file(pretrained: str) -> bool:
    """A path (suffix, separator or an existing file), not an open_clip tag like ``openai``."""
    return pretrained.endswith(WEIGHT_SUFFIXES) or os.sep in pretrained or Path(pretrained).exists()


def architectures() -> list[str]:
    """The names ``open_clip.list_models()`` gives once clipid's configs are registered, read
    from the same JSON files without importing open_clip (and torch): checking params stays
    instant. ``tests/test_check_params.py`` holds the two lists equal."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(spec.origin).parent / "model_configs"] if spec and spec.origin else []
    names = set()
    for config in (path for folder in [*folders, CLIPID_MODEL_CONFIGS]
                   for path in folder.glob("*.json")):
        cfg = json.loads(config.read_text(encoding="utf-8"))
        if all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):  # as open_clip
            names.add(config.stem)
    return sorted(names)


def _check_model(params: Params, where: _Where) -> None:
    name, pretrained = params.model.name, params.model.pretrained
    known = architectures()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
            "; see open_clip.list_models() and src/clipid/models/model_configs/"
        raise ConfigError(f"{where('model.name')}: 'model.name' is '{name}', which is neither an "
                          f"open_clip nor a clipid architecture{hint}")
    if not pretrained:
        return
    if looks_like_weight_file(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(f"{where('model.pretrained')}: 'model.pretrained' is "
                              f"'{pretrained}', a weight file that does not exist "
                              f"({path.absolute()})")
        return
    import open_clip  # only for a tag: the stage that uses the tag imports it anyway

    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ConfigError(f"{where('model.pretrained')}: 'model.pretrained' is '{pretrained}', "
                          f"neither a pretrained tag of {name} (tags: {', '.join(tags) or 'none'})"
                          " nor a weight file (.safetensors, .pt, .pth, .bin or a path)")


def _vision_config(name: str) -> dict:
    """``vision_cfg`` of an architecture, read from its JSON as :func:`architectures` does."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(spec.origin).parent / "model_configs"] if spec and spec.origin else []
    for folder in [*folders, CLIPID_MODEL_CONFIGS]:
        path = folder / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8")).get("vision_cfg", {})
    return {}


def _check_geometry(params: Params, where: _Where) -> None:
    """``model.image_size``/``mean``/``std`` lengths and the knobs that fit only a ViT (patch
    stride, SIE) or only a modified ResNet (last stride)."""
    model = params.model
    for key, length, what in (("image_size", 2, "[height, width]"), ("mean", 3, "[r, g, b]"),
                              ("std", 3, "[r, g, b]")):
        value = getattr(model, key)
        if value and len(value) != length:
            raise ConfigError(f"{where(f'model.{key}')}: 'model.{key}' is {value}; give "
                              f"{what} or [] for the architecture's own")
    size = model.image_size
    if size and size[0] != size[1] and params.train.augment_device == "batch":
        raise ConfigError(f"{where('train.augment_device')}: 'train.augment_device' batch "
                          f"augments square images; 'model.image_size' is {size} (use loader)")
    vision = _vision_config(model.name)
    resnet = isinstance(vision.get("layers"), (list, tuple))
    if resnet:
        _check_resnet_geometry(model, where)
    else:
        _check_vit_geometry(model, vision, where)


def _check_resnet_geometry(model: ModelParams, where: _Where) -> None:
    for key, bad in (("patch_stride", model.patch_stride), ("sie", model.sie)):
        if bad:
            raise ConfigError(f"{where(f'model.{key}')}: 'model.{key}' is for ViT image towers; "
                              f"{model.name} is a ResNet")
    reduction = 32 if model.last_stride == 2 else 16
    if any(side % reduction for side in model.image_size):
        raise ConfigError(f"{where('model.image_size')}: 'model.image_size' {model.image_size} "
                          f"is not a multiple of {reduction}, the feature stride of {model.name} "
                          f"with 'model.last_stride' {model.last_stride}")


def _check_vit_geometry(model: ModelParams, vision: dict, where: _Where) -> None:
    if model.last_stride != 2:
        raise ConfigError(f"{where('model.last_stride')}: 'model.last_stride' is for ResNet "
                          f"image towers; {model.name} is a ViT (keep 2)")
    patch = int(vision.get("patch_size", 0) or 0)
    if patch and model.patch_stride > patch:
        raise ConfigError(f"{where('model.patch_stride')}: 'model.patch_stride' "
                          f"({model.patch_stride}) is above the patch size ({patch}): pixels "
                          "between patches would be skipped")
    if patch and any(side < patch for side in model.image_size):
        raise ConfigError(f"{where('model.image_size')}: 'model.image_size' {model.image_size} "
                          f"is smaller than one {patch}-pixel patch")


def _check_batches(params: Params, where: _Where) -> None:
    train = params.train
    batch, nproc, k = train.batch_size, train.nproc, train.pk_k
    if batch % nproc:
        raise ConfigError(f"{where('train.batch_size')}: 'train.batch_size' ({batch}) is not a "
                          f"multiple of 'train.nproc' ({nproc}): each process trains on "
                          "batch_size / nproc images")
    pk_stages = [s for s in trained_stages() if stage_spec(params, s).sampler == "pk"]
    if (batch // nproc) % k:
        per_process = f" / 'train.nproc' ({nproc})" if nproc > 1 else ""
        raise ConfigError(f"{where('train.batch_size')}: 'train.batch_size' ({batch}){per_process}"
                          f" is not a multiple of 'train.pk_k' ({k}), as the PK sampler of "
                          f"{', '.join(pk_stages)} needs (P identities x K images per process)")



def _check_recipe(params: Params, where: _Where) -> None:
    """CLIP-ReID's knobs that only fit together one way."""
    train = params.train
    if list(train.milestones) != sorted(train.milestones):
        raise ConfigError(f"{where('train.milestones')}: 'train.milestones' {train.milestones} "
                          "must be in increasing order")
    if train.augment.policy == "pad_crop" and train.augment_device == "batch":
        raise ConfigError(f"{where('train.augment.policy')}: 'train.augment.policy' pad_crop "
                          "runs in the loader only (train.augment_device: loader)")
