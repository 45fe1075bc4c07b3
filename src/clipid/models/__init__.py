"""Model layer: clipid's own architectures registered with open_clip, and model helpers."""

from __future__ import annotations

from pathlib import Path

import open_clip

from clipid.config import ConfigError

__all__ = ["MODEL_CONFIG_DIR", "get_model_config", "text_context_length"]

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

# Architectures are JSON data, as in open_clip: registering the folder makes every clipid config
# available to open_clip.create_model by name.
if MODEL_CONFIG_DIR not in open_clip.factory._MODEL_CONFIG_PATHS:
    open_clip.add_model_config(MODEL_CONFIG_DIR)


def get_model_config(name: str) -> dict:
    """The architecture config of an open_clip or clipid model; a clear error if unknown."""
    from clipid.models.hub import hub_access

    with hub_access("model.name", name):
        config = open_clip.get_model_config(name)
    if config is None:
        known = ", ".join(open_clip.list_models()[:12])
        raise ConfigError(f"model.name: unknown architecture '{name}' (known include: {known}, "
                          "...; see open_clip.list_models())")
    return config


def text_context_length(name: str) -> int:
    """Tokens the text tower reads, start and end markers included."""
    return int(get_model_config(name).get("text_cfg", {}).get("context_length", 77))
