"""Weights and configs from the Hugging Face Hub, as open_clip names them, failing fast offline.

open_clip reaches the hub for a pretrained tag (``ViT-B-16`` / ``openai``), for an ``hf-hub:org/
name`` model and for ``hf-hub:org/name`` weights. On a machine that cannot reach it,
huggingface_hub retries every file for about a minute and warns at each try. Here the local
cache is looked at first; when what is needed is not there, one short connection attempt to the
hub (``HF_ENDPOINT``) decides, and an unreachable hub (or ``HF_HUB_OFFLINE``) is one line of
error at once. When everything is cached and the hub is unreachable, open_clip runs with the hub
switched off, so it reads the cache without a single retry.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

from clipid.checks import HF_HUB
from clipid.errors import ClipidError

__all__ = ["HF_HUB", "HubUnavailable", "ModelLoadError", "hub_repo", "hub_access", "is_hub_name"]

_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_CONFIG_FILE = "open_clip_config.json"
_CONNECT_TIMEOUT_S = 3.0


class ModelLoadError(ClipidError):
    """Weights that cannot be had: unknown tag, missing file, offline machine."""


class HubUnavailable(ModelLoadError):
    """Weights or a config that are neither in the local cache nor reachable (offline)."""


def is_hub_name(value: str) -> bool:
    return value.startswith(HF_HUB)


def hub_repo(value: str) -> str:
    """``hf-hub:org/name`` -> ``org/name``."""
    return value[len(HF_HUB):].strip("/")


def _cached(repo: str, names: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)


def _tag_files(name: str, tag: str) -> tuple[str, tuple[str, ...]] | None:
    """The hub repo and file names of open_clip's pretrained tag (None: not on the hub)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    hub = cfg.get("hf_hub", "")
    if not hub or os.path.isfile(cfg.get("file") or ""):  # open_clip reads a local file first
        return None
    repo, filename = os.path.split(hub)
    return repo, (filename,) if filename else _WEIGHT_FILES


def _unreachable() -> str:
    """Why the hub cannot be reached ("" when it can)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "this machine is offline: HF_HUB_OFFLINE is set"
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return f"this machine is offline: {constants.ENDPOINT} cannot be reached: " \
               f"{exc.strerror or exc}"
    return ""


@contextlib.contextmanager
def _hub_switched_off() -> Iterator[None]:
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def hub_access(key: str, name: str, pretrained: str = "") -> Iterator[None]:
    """Around an open_clip call that may need the hub for ``name``/``pretrained``: raises
    :class:`HubUnavailable` (naming ``key``) at once when what it needs is neither cached nor
    reachable; switches the hub off when it is cached but unreachable."""
    if is_hub_name(name):
        needed = (hub_repo(name), (_CONFIG_FILE,))
        what = f"the config and weights of {name}"
    elif is_hub_name(pretrained):
        needed = (hub_repo(pretrained), _WEIGHT_FILES)
        what = f"the weights {pretrained}"
    else:
        needed = _tag_files(name, pretrained) if pretrained else None
        what = f"the '{pretrained}' weights of {name}"
    if needed is None:
        yield
        return
    cached = _cached(*needed)
    why = _unreachable()
    if why and not cached:
        raise HubUnavailable(
            f"{key}: {what} are not in the local Hugging Face cache and {why}; fetch them once "
            "on a machine with internet (open_clip caches them under ~/.cache/huggingface), or "
            "save the weights as a .safetensors/.pt file and set model.pretrained to its path")
    with _hub_switched_off() if why else contextlib.nullcontext():
        yield
