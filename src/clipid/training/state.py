"""Resumable training state without pickle: nested dicts/lists of tensors and plain values are
stored as one safetensors file (the tensors) plus one JSON file (the structure)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ["save_state", "load_state"]

_TENSOR = "__tensor__"


def _flatten(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(value, dict):
        # JSON keys are strings: keep int keys (optimizer state is keyed by param index) typed.
        return {"__dict__": [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {key} in a training state")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and _TENSOR in value:
        return tensors[value[_TENSOR]]
    if isinstance(value, dict) and "__dict__" in value:
        return {k: _unflatten(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def save_state(state: dict[str, Any], directory: Path) -> None:
    """Write ``state`` atomically: a reader sees the previous complete state or the new one."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    # Both files carry one token: a kill between the two renames leaves a mismatch that
    # load_state treats as no state, never as a mix of two epochs.
    token = os.urandom(8).hex()
    tmp_tensors, tmp_json = directory / "state.safetensors.tmp", directory / "state.json.tmp"
    save_file(tensors, str(tmp_tensors), metadata={"token": token})
    tmp_json.write_text(json.dumps({"token": token, "state": skeleton}), encoding="utf-8")
    os.replace(tmp_tensors, directory / "state.safetensors")
    os.replace(tmp_json, directory / "state.json")


def load_state(directory: Path) -> dict[str, Any] | None:
    """The saved state, or None when there is none (or only a partial one)."""
    tensors_file, json_file = directory / "state.safetensors", directory / "state.json"
    if not (tensors_file.is_file() and json_file.is_file()):
        return None
    try:
        saved = json.loads(json_file.read_text(encoding="utf-8"))
        with safe_open(str(tensors_file), framework="pt") as fh:
            token = (fh.metadata() or {}).get("token")
        if token != saved.get("token"):
            return None
        return _unflatten(saved["state"], load_file(str(tensors_file)))
    except (json.JSONDecodeError, KeyError, OSError, ValueError):
        return None
