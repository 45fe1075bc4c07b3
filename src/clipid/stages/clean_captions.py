"""Stage ``clean_captions``: raw captions of ``manifest.csv`` -> ``image_texts.json``.

``image_texts.json`` maps each prepared image (its path relative to ``data/prepared``) to one
clean caption that fits the text tower of ``model.name``; ``metrics/captions.json`` counts every
fix.
"""

from __future__ import annotations

import json
import logging

import pandas as pd
from tqdm import tqdm

from clipid.config import Params
from clipid.data.captions import CaptionCleaner
from clipid.workspace import Workspace

log = logging.getLogger(__name__)


def clean_captions(params: Params, workspace: Workspace | None = None) -> dict:
    """The workspace's manifest -> its ``image_texts.json`` and ``metrics/captions.json``;
    returns the counts written to the latter."""
    from open_clip.tokenizer import SimpleTokenizer

    from clipid.models import text_context_length

    workspace = workspace or Workspace()
    manifest, out, metrics_path = (workspace.manifest, workspace.image_texts,
                                   workspace.caption_metrics)
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    images = table.drop_duplicates("image")  # an image repeated across draws has one caption
    cleaner = CaptionCleaner(encode=SimpleTokenizer().encode,
                             context_length=text_context_length(params.model.name),
                             casing=params.captions.casing, fallback=params.captions.fallback,
                             noun=params.captions.noun)
    texts = {row.image: cleaner.clean(row.caption, row.attributes)
             for row in tqdm(images.itertuples(), total=len(images), desc="clean_captions")}
    out.write_text(json.dumps(texts, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    summary = cleaner.summary()
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("cleaned %d captions: %s", len(texts), summary)
    return summary
