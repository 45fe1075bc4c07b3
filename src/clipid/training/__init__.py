"""The one training engine and its parts.

``engine`` (the :class:`~clipid.training.engine.Trainer`: a registry entry to a checkpoint),
``objective`` (towers, heads, centres and named weighted loss terms in one module DDP wraps),
``loop`` (the epoch loop, optimisation step and resumable state every stage shares, the prompt
stage included), ``prompts`` (CLIP-ReID's prompt stage and its ``i2t`` term), ``losses``,
``samplers``, ``heads``, ``towers``, ``schedule``, ``data`` and ``state`` (pickle-free resume).
"""
