"""Stage ``track`` (``clipid track``): the last stage of every ``dvc repro`` and ``dvc exp run``
(``always_changed``, no outputs), which makes MLflow the complete view of what DVC built
(:mod:`clipid.reconcile`). It writes nothing DVC tracks, so the store's ids stay out of DVC's
outputs. A store that cannot be reached keeps the view in the spool and says so last.
"""

from __future__ import annotations

import dataclasses

from clipid import tracking
from clipid.config import Params
from clipid.reconcile import reconcile, snapshot, write_spooled
from clipid.workspace import Workspace


def track_stage(params: Params, workspace: Workspace | None = None) -> list[str]:
    """Reconcile the store with the workspace's outputs; returns the changes made."""
    snap = snapshot(params, dataclasses.asdict(params), workspace)
    if snap is None:
        print("track: not in a git repository: no pipeline execution to track")
        return []
    root = tracking.store_root()
    try:
        client, experiment_id = tracking.open_store(snap.uri, snap.experiment,
                                                    snap.artifact_location)
        tracking.replay_spool(client, root, snap.uri)  # what the store missed comes first
        changes = reconcile(client, snap, experiment_id)
    except Exception as error:  # noqa: BLE001 - tracking never stops the pipeline
        path = write_spooled(snap, root)
        tracking.UNTRACKED.append(f"MLflow view of {snap.label} not reconciled: spooled to "
                                  f"{path} ({type(error).__name__}: {error})")
        return []
    for line in changes:
        print(f"track: {line}")
    print(f"track: {snap.label}: {len(changes)} change(s); the store at {snap.uri} holds "
          f"every stage of it")
    return changes
