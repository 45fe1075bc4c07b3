"""Stage ``fingerprint``: ``data/fingerprint.json``, what ``prepare`` reads under ``data.root``.

DVC runs it on every ``dvc repro`` (``always_changed``); ``prepare`` depends on its output, so it
reruns exactly when a file it reads changed. See :mod:`clipid.data.fingerprint`.
"""

from __future__ import annotations

import logging

from clipid.config import Params
from clipid.data.fingerprint import fingerprint_json
from clipid.workspace import Workspace

log = logging.getLogger(__name__)


def fingerprint_stage(params: Params, workspace: Workspace | None = None) -> str:
    """Write the fingerprint of ``params.data``'s source to the workspace's
    ``data/fingerprint.json``; returns the text."""
    out = (workspace or Workspace()).fingerprint
    text = fingerprint_json(params.data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    log.info("fingerprint of data.source '%s' written to %s", params.data.source, out)
    return text
