"""Pieces of real-image editing: partial time grids and prompt-to-prompt attention control.

PRISM stage 3 / prompt-to-prompt (Hertz et al. 2023): an edit regenerates the inverted
scan under the target prompt while the target's cross-attention maps follow the
source's for the words both prompts share, for the first part of the sampling run.
Spatial layout then comes from the scan, the change from the words that differ.

We run source and target in ONE batch (rows ``src`` and ``tgt``), so the controller
copies maps between rows of the same call instead of recording a whole run first:
half the memory of store-then-replay and no ordering constraints.
"""

from __future__ import annotations

import difflib
from typing import Sequence

import torch

from ..errors import InputError
from ..nets.attention import AttentionSite

__all__ = ["partial_grid", "align_tokens", "InjectSourceAttention"]


def partial_grid(full: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a decreasing time grid that starts at ``t = strength``.

    SDEdit-style partial inversion: ``strength`` ∈ (0, 1] is how far towards noise the
    scan is inverted (1 = all the way). The returned grid starts exactly at
    ``strength`` and keeps every point of ``full`` below it, ending at 0.
    """
    if not 0.0 < float(strength) <= 1.0:
        raise InputError(f"strength must be in (0, 1]; got {strength}.")
    tail = full[full < float(strength)]
    head = torch.tensor([float(strength)], dtype=full.dtype)
    grid = torch.cat([head, tail])
    if grid.numel() < 2:
        raise InputError("strength is too small for this number of steps; raise --strength or --steps.")
    return grid


def align_tokens(source: Sequence[str], target: Sequence[str], length: int) -> torch.Tensor:
    """For each of ``length`` target token positions, the source position it shares (−1 = none).

    Tokens are matched by ``difflib`` longest common blocks — prompt-to-prompt's
    "refine" alignment for prompts of different lengths. Padding positions map to −1.
    """
    tm = torch.full((int(length),), -1, dtype=torch.long)
    sm = difflib.SequenceMatcher(a=list(source), b=list(target), autojunk=False)
    for block in sm.get_matching_blocks():
        for k in range(block.size):
            if block.b + k < length and block.a + k < length:
                tm[block.b + k] = block.a + k
    return tm


class InjectSourceAttention:
    """Copy the source row's cross-attention onto the target row for shared tokens.

    During the first ``until_fraction`` of calls (one call per sampler step and block),
    target token ``j`` with ``token_map[j] = i ≥ 0`` gets the source's map for token
    ``i``; unshared target tokens keep their own map, multiplied by ``edit_weight``
    (prompt-to-prompt "reweight"; PRISM uses ~2). Rows are renormalised to sum to 1.

    Args:
        token_map: from :func:`align_tokens`.
        src_rows / tgt_rows: batch rows of source and target (same length).
        total_calls: network calls per block in the run (= sampler steps).
        until_fraction: fraction of calls to inject for (PRISM: 0.8).
        edit_weight: weight of the target's own (edited) words.
        edited_tokens: positions of the target's edited words (default: real tokens with
            ``token_map == -1``; pass the target mask to exclude padding).
    """

    def __init__(self, token_map: torch.Tensor, src_rows: Sequence[int], tgt_rows: Sequence[int], *,
                 total_calls: int, until_fraction: float = 0.8, edit_weight: float = 1.0,
                 edited_tokens: torch.Tensor | None = None) -> None:
        if len(src_rows) != len(tgt_rows):
            raise InputError("source and target rows must pair up one to one.")
        if not 0.0 <= until_fraction <= 1.0:
            raise InputError(f"until_fraction must be in [0, 1]; got {until_fraction}.")
        self.token_map = torch.as_tensor(token_map, dtype=torch.long)
        self.src_rows, self.tgt_rows = list(src_rows), list(tgt_rows)
        self.total_calls = int(total_calls)
        self.until_fraction = float(until_fraction)
        self.edit_weight = float(edit_weight)
        self.edited = edited_tokens

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        if site.call_index >= self.until_fraction * self.total_calls:
            return probs
        tm = self.token_map.to(probs.device)
        if tm.numel() != probs.shape[-1]:
            raise InputError(f"token map has {tm.numel()} entries, the attention {probs.shape[-1]} tokens.")
        out = probs.clone()
        src = probs[self.src_rows]
        tgt = probs[self.tgt_rows]
        new = torch.where(tm >= 0, src[..., tm.clamp(min=0)], tgt)
        if self.edit_weight != 1.0 and self.edited is not None:
            w = torch.where(self.edited.to(probs.device), self.edit_weight, 1.0).to(probs.dtype)
            new = new * w
        out[self.tgt_rows] = new / new.sum(-1, keepdim=True).clamp(min=1e-12)
        return out
