"""clipid: fine-tune CLIP (open_clip) for identity-level image retrieval, as a DVC pipeline."""

__version__ = "0.1.0"
