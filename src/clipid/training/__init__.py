"""The one training engine and its parts; stages differ only by their ``StageParams``."""
