"""Verification rates of "are these two images the same identity?" over every query-gallery
pair: TPR at FPR <= 1e-4, 1e-3, 1e-2 and the equal error rate, exact (the definition is
:func:`clipid.metrics.reference.verification_loop`).

The pairs are fast-reid's (``evaluate_roc``): every query-gallery pair but those of the same
identity and camera; a pair is positive when of the same identity and accepted when its
distance is at most the threshold. Both figures are order statistics of the pair distances:
TPR at FPR <= f counts the positives below the ``floor(f * negatives) + 1``-th smallest negative
distance, and the EER lies at the first distance where FNR <= FPR. Neither needs the pairs
sorted: a radix select finds those distances, 16 bits of an order-preserving integer key of
each distance per pass over the matrix (two passes for float32), each pass a histogram of one
row block at a time. The pairs never exist as a list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from clipid.metrics.rank import SameIdentity, _check

__all__ = ["REPORTED_FPRS", "ROC_GRID", "Verification", "fpr_name", "verification"]

REPORTED_FPRS = (1e-4, 1e-3, 1e-2)  # fast-reid's TPR@FPR figures
# The ROC plot: TPR at FPR <= f, from f = 0 then 5 points per decade from 1e-4 to 1.
ROC_GRID = (0.0, *(float(f"{10 ** (e / 5):.3g}") for e in range(-20, 1)))
DIGIT = 16  # key bits resolved per pass


def fpr_name(fpr: float) -> str:
    """``TPR_at_FPR_1e-4``: the metric name (MLflow takes no '@' or '=')."""
    return f"TPR_at_FPR_{fpr:.0e}".replace("e-0", "e-")


class Verification(NamedTuple):
    tpr: dict[float, float]  # FPR f -> the highest TPR at a threshold with FPR <= f
    eer: float               # equal error rate
    positives: int           # positive pairs
    negatives: int           # negative pairs

    def summary(self, fprs: Sequence[float] = REPORTED_FPRS) -> dict[str, float]:
        return {**{fpr_name(f): self.tpr[f] for f in fprs}, "EER": self.eer}


class _Pairs:
    """The matrix as order-preserving integer keys, one row block at a time, with the keys of
    each block's same-identity entries and which of those are positives (another camera)."""

    def __init__(self, distmat: np.ndarray, q_ids, g_ids, q_cams, g_cams, block_elements: int):
        _check(distmat, q_ids, g_ids, q_cams, g_cams)
        if distmat.dtype not in (np.float32, np.float64):
            distmat = distmat.astype(np.float32 if distmat.dtype == np.float16 else np.float64)
        self.distmat = distmat
        self.identity = SameIdentity.of(q_ids, g_ids)
        self.cams = None if q_cams is None else (np.asarray(q_cams), np.asarray(g_cams))
        self.bits = distmat.dtype.itemsize * 8
        self.unsigned = np.dtype(f"uint{self.bits}")
        lowest = distmat.min() if distmat.size else 0.0  # NaN if any is: min propagates it
        if np.isnan(lowest):
            raise ValueError("verification needs distances that are not NaN")
        # Non-negative floats order as their bit patterns; otherwise the sign is folded in.
        self.signed = bool(lowest < 0)
        n_q, n_g = distmat.shape
        self.block_elements = block_elements
        step = max(1, block_elements // max(n_g, 1))
        self.blocks = [(a, min(a + step, n_q)) for a in range(0, n_q, step)]

    def keys(self, values: np.ndarray) -> np.ndarray:
        bits = (values + 0.0).view(self.unsigned)  # + 0.0: -0.0 becomes 0.0, its equal
        if not self.signed:
            return bits
        sign = bits >> self.unsigned.type(self.bits - 1)
        top = self.unsigned.type(1 << (self.bits - 1))
        return bits ^ (sign * (top - self.unsigned.type(1)) | top)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(keys of the block, keys of its same-identity entries, positive mask)``."""
        for start, stop in self.blocks:
            block = self.distmat[start:stop]
            rows, same = self.identity.entries(start, stop)
            keys = self.keys(block).ravel()
            same_keys = keys[rows * block.shape[1] + same]
            if self.cams is None:
                positive = np.ones(len(same), dtype=bool)
            else:
                positive = self.cams[1][same] != self.cams[0][start + rows]
            yield keys, same_keys, positive


class _Target(NamedTuple):
    """A search for the first distinct distance where ``reached(negatives <= it, positives <=
    it)`` holds, narrowed to the keys that start with ``prefix`` (the digits found so far),
    below which lie ``neg`` negatives and ``pos`` positives, and at which (once every digit is
    found: at that one distance) ``neg_at`` and ``pos_at``."""

    reached: Callable[[np.ndarray, np.ndarray], np.ndarray]
    prefix: int = 0
    neg: int = 0
    pos: int = 0
    neg_at: int = 0
    pos_at: int = 0


class _Counter:
    """``bincount`` of codes gathered over blocks, counted a block's worth at a time (a few
    codes per block under a long prefix list would otherwise zero the counts per block)."""

    def __init__(self, size: int, flush_at: int, dtype: type):
        self.counts = np.zeros(size, dtype=dtype)
        self.pending: list[np.ndarray] = []
        self.held, self.flush_at = 0, flush_at

    def add(self, codes: np.ndarray) -> None:
        self.pending.append(codes)
        self.held += len(codes)
        if self.held >= self.flush_at:
            self.flush()

    def flush(self) -> np.ndarray:
        if self.pending:  # counts fit the dtype: no bin holds more than every pair
            self.counts += np.bincount(np.concatenate(self.pending),
                                       minlength=len(self.counts)).astype(self.counts.dtype)
        self.pending, self.held = [], 0
        return self.counts


def _histograms(pairs: _Pairs, prefixes: np.ndarray, level: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Negatives and positives by (prefix, next digit): ``(len(prefixes), 2**DIGIT)`` counts
    of the keys that start with one of ``prefixes`` (``level`` digits)."""
    width = 1 << DIGIT
    shift = pairs.bits - DIGIT * (level + 1)
    top = pairs.bits - DIGIT
    # First digit -> 1 + the slot of the one prefix that starts with it (level 1), or 1 for
    # any prefix that does (deeper levels, which then search the prefixes), 0 for none.
    lut = np.zeros(width, dtype=np.intp)
    if level:
        lut[prefixes >> (DIGIT * (level - 1))] = np.arange(1, len(prefixes) + 1)

    def codes(keys: np.ndarray) -> np.ndarray:
        """(prefix slot, digit) codes of the keys under one of the prefixes."""
        if level == 0:
            return np.right_shift(keys, shift, out=np.empty(len(keys), dtype=np.intp))
        slot = lut[np.right_shift(keys, top, out=np.empty(len(keys), dtype=np.intp))]
        under = np.flatnonzero(slot)  # cheap filter: the first digit
        keys, slot = keys[under], slot[under] - 1
        if level > 1:
            head = keys >> (shift + DIGIT)
            slot = np.minimum(np.searchsorted(prefixes, head), len(prefixes) - 1)
            keys, slot = keys[prefixes[slot] == head], slot[prefixes[slot] == head]
        return slot * width + (keys >> shift & (width - 1)).astype(np.intp)

    # int32 counts where they fit: the (prefixes x 65536) histograms are the memory peak.
    dtype = np.int32 if pairs.distmat.size < 2**31 else np.int64
    total, same, positive = (_Counter(len(prefixes) * width, pairs.block_elements, dtype)
                             for _ in range(3))
    for keys, same_keys, is_positive in pairs:
        total.add(codes(keys))
        same.add(codes(same_keys))
        positive.add(codes(same_keys[is_positive]))
    negative = np.subtract(total.flush(), same.flush(), out=total.counts)
    return (negative.reshape(len(prefixes), width).astype(np.int64),
            positive.flush().reshape(len(prefixes), width).astype(np.int64))


def _narrow(targets: list[_Target], pairs: _Pairs, level: int) -> list[_Target]:
    """One pass: each target's next digit, the first whose cumulative counts reach it."""
    prefixes = np.unique([t.prefix for t in targets]).astype(pairs.unsigned)
    negative, positive = _histograms(pairs, prefixes, level)
    out = []
    for t in targets:
        slot = int(np.searchsorted(prefixes, t.prefix))
        neg = t.neg + np.cumsum(negative[slot])
        pos = t.pos + np.cumsum(positive[slot])
        digit = int(np.argmax(t.reached(neg, pos)))
        below = (neg[digit - 1], pos[digit - 1]) if digit else (t.neg, t.pos)
        out.append(_Target(t.reached, (t.prefix << DIGIT) | digit, int(below[0]),
                           int(below[1]), int(negative[slot, digit]),
                           int(positive[slot, digit])))
    return out


def _counts(pairs: _Pairs) -> tuple[int, int]:
    """``(positives, negatives)``: same-identity pairs on another camera, other identities."""
    n_pos = n_same = 0
    for start, stop in pairs.blocks:
        rows, same = pairs.identity.entries(start, stop)
        n_same += len(same)
        n_pos += len(same) if pairs.cams is None else int(np.count_nonzero(
            pairs.cams[1][same] != pairs.cams[0][start + rows]))
    return n_pos, pairs.distmat.size - n_same


def verification(distmat: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                 q_cams: np.ndarray | None = None, g_cams: np.ndarray | None = None,
                 fprs: Sequence[float] = REPORTED_FPRS,
                 block_elements: int = 1 << 18) -> Verification:
    """TPR at FPR <= each of ``fprs`` and the EER of every query-gallery pair (see the module
    and :func:`clipid.metrics.reference.verification_loop`, the definition it equals), with
    the pairs of about ``block_elements`` matrix entries in memory at a time."""
    pairs = _Pairs(np.asarray(distmat), q_ids, g_ids, q_cams, g_cams, block_elements)
    n_pos, n_neg = _counts(pairs)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"verification needs positive and negative pairs, got {n_pos} "
                         f"positive and {n_neg} negative (same-identity same-camera pairs "
                         "left out)")
    # TPR at FPR <= f: positives below the (floor(f * n_neg) + 1)-th smallest negative.
    ranks = {f: math.floor(f * n_neg) + 1 for f in fprs}
    targets = [_Target(lambda neg, pos, r=r: neg >= r) for r in ranks.values() if r <= n_neg]
    # EER: the first distance where FNR <= FPR, i.e. (n_pos - pos) * n_neg <= neg * n_pos.
    targets.append(_Target(lambda neg, pos: (n_pos - pos) * n_neg <= neg * n_pos))
    for level in range(pairs.bits // DIGIT):
        targets = _narrow(targets, pairs, level)
    found = iter(targets[:-1])
    tpr = {f: 1.0 if r > n_neg else next(found).pos / n_pos for f, r in ranks.items()}
    return Verification(tpr, _eer(targets[-1], n_pos, n_neg), n_pos, n_neg)


def _eer(target: _Target, n_pos: int, n_neg: int) -> float:
    """Where the ROC segment from the point below the target distance to the point at it
    crosses FNR = FPR."""
    before = (target.neg / n_neg, target.pos / n_pos)
    after = ((target.neg + target.neg_at) / n_neg, (target.pos + target.pos_at) / n_pos)
    gap_before, gap_after = 1 - before[1] - before[0], 1 - after[1] - after[0]
    return before[0] + (after[0] - before[0]) * gap_before / (gap_before - gap_after)
