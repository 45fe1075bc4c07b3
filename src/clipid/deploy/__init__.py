"""Deployable models: an MLflow Model (pyfunc) per trained stage, the Model Registry with its
``champion`` alias, and ONNX export of the towers."""

from __future__ import annotations

IMAGE_MODEL = "clipid-image"   # registered model for image queries
TEXT_MODEL = "clipid-text"     # ... and for text queries (stages with a text tower)
CHAMPION = "champion"          # the alias on the best version of each

__all__ = ["CHAMPION", "IMAGE_MODEL", "TEXT_MODEL"]
