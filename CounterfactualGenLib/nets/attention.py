"""3D cross-attention control for prompt-to-prompt editing (Hertz et al. 2023; PRISM stage 3).

While :class:`AttentionControl` is active, every MONAI cross-attention block inside a
network (``monai.networks.blocks.crossattention.CrossAttentionBlock``, the ``attn2`` of
each transformer block in MONAI's ``SpatialTransformer``) runs through our own forward,
which computes the attention probabilities explicitly and hands them to a controller:

``probs = controller(probs, site)`` with ``probs`` of shape (B, heads, N_query, L_tokens)
(``N_query`` = voxels of that level, flattened in (D, H, W) order) and ``site`` saying
which block, which call, and at which spatial size. Controllers can record them
(:class:`StoreAttention`), replace them with a recorded run (:class:`ReplaceAttention`)
or reweight tokens (:class:`ReweightTokens`).

When the controller returns its input unchanged, the output equals MONAI's own forward
(same operations in the same order; only the flash/SDPA kernel is replaced by the
explicit product). Original forwards are restored on exit, also after exceptions.

With :func:`~CounterfactualGenLib.sampling.samplers.guided`, each call's batch is
``[null; cond]``; use ``batch_rows=slice(B, None)`` to touch only the conditional half,
as prompt-to-prompt does.

Example:
    >>> store = StoreAttention()
    >>> with AttentionControl(denoiser, store):           # doctest: +SKIP
    ...     x0 = sample_rflow(model_fn_source, noise, grid)
    >>> edit = ReplaceAttention(store.maps, until_fraction=0.8)
    >>> with AttentionControl(denoiser, edit):            # doctest: +SKIP
    ...     x0_edit = sample_rflow(model_fn_target, noise, grid)
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import InputError, ModelError

__all__ = [
    "AttentionControl",
    "AttentionController",
    "AttentionSite",
    "ReplaceAttention",
    "ReweightTokens",
    "StoreAttention",
]


@dataclass(frozen=True)
class AttentionSite:
    """Where an attention call happens.

    Attributes:
        name: qualified module name of the cross-attention block inside the network.
        call_index: how many times this block has run since the control became active (0-based).
        spatial_shape: (D, H, W) of the queries, or None if unknown.
        num_heads: attention heads of the block.
    """

    name: str
    call_index: int
    spatial_shape: tuple[int, ...] | None
    num_heads: int


class AttentionController(Protocol):
    """Anything called as ``controller(probs, site) -> probs``."""

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor: ...


def _rows(batch_rows: slice | Sequence[int] | None) -> Any:
    return slice(None) if batch_rows is None else batch_rows


class StoreAttention:
    """Record cross-attention probabilities per block and call (prompt-to-prompt's source pass).

    Args:
        to_cpu: move recorded maps to the CPU (saves GPU memory for long runs).
        dtype: storage dtype (e.g. ``torch.float16`` halves memory); None keeps the original.

    Attributes:
        maps: ``{block name: [probs of call 0, call 1, …]}``, each (B, heads, N_query, L).
        spatial_shapes: ``{block name: (D, H, W)}`` of each block's queries.
    """

    def __init__(self, *, to_cpu: bool = False, dtype: torch.dtype | None = None) -> None:
        self.to_cpu = to_cpu
        self.dtype = dtype
        self.maps: dict[str, list[torch.Tensor]] = {}
        self.spatial_shapes: dict[str, tuple[int, ...] | None] = {}

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        saved = probs.detach()
        if self.dtype is not None:
            saved = saved.to(self.dtype)
        if self.to_cpu:
            saved = saved.cpu()
        self.maps.setdefault(site.name, []).append(saved)
        self.spatial_shapes[site.name] = site.spatial_shape
        return probs

    def mean_map(self, token: int, *, name: str | None = None) -> torch.Tensor:
        """Average attention to ``token`` over calls, heads and batch, as a 3D map per block.

        Args:
            token: token index in the prompt.
            name: one block; None = the first recorded block.

        Returns:
            (D, H, W) float32 map of that block's query grid.
        """
        if not self.maps:
            raise InputError("no attention was recorded; run a sampler inside AttentionControl(…, StoreAttention()).")
        key = name if name is not None else next(iter(self.maps))
        stack = torch.stack([m[..., token].float().mean(dim=(0, 1)) for m in self.maps[key]])
        shape = self.spatial_shapes.get(key)
        mean = stack.mean(0)
        return mean.reshape(shape) if shape else mean


class ReplaceAttention:
    """Inject recorded attention maps for the first part of the run (prompt-to-prompt "replace").

    Call ``k`` of block ``name`` uses ``stored[name][k]`` (so the edited run must make
    the same calls in the same order as the recorded one). For token ``j`` of the new
    prompt the map of source token ``token_map[j]`` is used; ``token_map[j] = -1`` keeps
    the new prompt's own map (words that have no counterpart).

    Args:
        stored: maps from :class:`StoreAttention` (``store.maps``).
        token_map: (L_new,) long tensor or list of source token indices (−1 = keep own);
            None = identity (same tokenisation length).
        until_fraction: replace during the first ``until_fraction`` of the recorded calls
            of each block (prompt-to-prompt: ~0.8 for cross-attention).
        batch_rows: batch rows to edit (e.g. ``slice(B, None)`` = conditional half of a
            CFG batch); None = all rows.
    """

    def __init__(
        self,
        stored: dict[str, list[torch.Tensor]],
        token_map: torch.Tensor | Sequence[int] | None = None,
        *,
        until_fraction: float = 0.8,
        batch_rows: slice | Sequence[int] | None = None,
    ) -> None:
        if not 0.0 <= until_fraction <= 1.0:
            raise InputError(f"until_fraction must be in [0, 1]; got {until_fraction}.")
        self.stored = stored
        self.token_map = None if token_map is None else torch.as_tensor(token_map, dtype=torch.long)
        self.until_fraction = until_fraction
        self.batch_rows = batch_rows

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        calls = self.stored.get(site.name)
        if not calls:
            return probs
        if site.call_index >= len(calls):
            raise InputError(
                f"attention block {site.name} ran more often ({site.call_index + 1}) than in the recorded "
                f"run ({len(calls)}); replay with the same time grid and guidance as the recording."
            )
        if site.call_index >= self.until_fraction * len(calls):
            return probs
        src = calls[site.call_index].to(device=probs.device, dtype=probs.dtype)
        rows = _rows(self.batch_rows)
        cur = probs[rows]
        src = src[rows]
        if src.shape[:3] != cur.shape[:3]:
            raise InputError(
                f"recorded attention {tuple(src.shape)} does not match the current one {tuple(cur.shape)} "
                f"in {site.name}; use the same batch layout and volume size as the recording."
            )
        if self.token_map is None:
            if src.shape[-1] != cur.shape[-1]:
                raise InputError("prompts have different token counts; pass a token_map.")
            new = src
        else:
            tm = self.token_map.to(probs.device)
            if tm.numel() != cur.shape[-1]:
                raise InputError(f"token_map has {tm.numel()} entries but the prompt has {cur.shape[-1]} tokens.")
            new = torch.where(tm >= 0, src[..., tm.clamp(min=0)], cur)
        out = probs.clone()
        out[rows] = new
        return out


class ReweightTokens:
    """Scale the attention paid to some tokens (prompt-to-prompt "reweight"; PRISM uses ~2).

    Args:
        indices: token indices to scale.
        weight: multiplier (>1 strengthens the word's effect, <1 weakens it).
        batch_rows: batch rows to edit; None = all.
        until_fraction: reweight only during the first part of the run, measured in calls
            per block against ``total_calls``; None = always.
        total_calls: number of calls per block in the run (needed with ``until_fraction``).
    """

    def __init__(
        self,
        indices: Sequence[int] | torch.Tensor,
        weight: float,
        *,
        batch_rows: slice | Sequence[int] | None = None,
        until_fraction: float | None = None,
        total_calls: int | None = None,
    ) -> None:
        if until_fraction is not None and not total_calls:
            raise InputError("ReweightTokens(until_fraction=…) also needs total_calls (network calls per block).")
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.weight = float(weight)
        self.batch_rows = batch_rows
        self.until_fraction = until_fraction
        self.total_calls = total_calls

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        if self.until_fraction is not None and site.call_index >= self.until_fraction * float(self.total_calls or 0):
            return probs
        if self.indices.numel() and int(self.indices.max()) >= probs.shape[-1]:
            raise InputError(f"token index {int(self.indices.max())} is beyond the prompt's {probs.shape[-1]} tokens.")
        rows = _rows(self.batch_rows)
        out = probs.clone()
        idx = self.indices.to(probs.device)
        sub = out[rows]
        sub[..., idx] = sub[..., idx] * self.weight
        out[rows] = sub
        return out


class _Chain:
    def __init__(self, controllers: Sequence[AttentionController]) -> None:
        self.controllers = list(controllers)

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        for c in self.controllers:
            probs = c(probs, site)
        return probs


def _cross_attention_class() -> type[nn.Module]:
    from monai.networks.blocks.crossattention import CrossAttentionBlock

    return CrossAttentionBlock


def _controlled_forward(
    block: nn.Module, x: torch.Tensor, context: torch.Tensor | None, *, control: AttentionControl, name: str
) -> torch.Tensor:
    """MONAI ``CrossAttentionBlock.forward`` (non-flash path) with a controller on the probabilities."""
    if context is None:
        raise InputError(f"{name} ran without a text context; controlled attention needs cross-attention.")
    q = block.input_rearrange(block.to_q(x))
    k = block.input_rearrange(block.to_k(context))
    v = block.input_rearrange(block.to_v(context))
    if block.attention_dtype is not None:
        q = q.to(block.attention_dtype)
        k = k.to(block.attention_dtype)
    logits = torch.einsum("blxd,blyd->blxy", q, k) * block.scale
    probs = logits.softmax(dim=-1)
    site = AttentionSite(
        name=name,
        call_index=control._next_call(name),
        spatial_shape=control._spatial_shape(name),
        num_heads=block.num_heads,
    )
    probs = control.controller(probs, site)
    if block.save_attn:
        block.att_mat = probs.detach()
    probs = block.drop_weights(probs)
    out = torch.einsum("bhxy,bhyd->bhxd", probs.to(v.dtype), v)
    out = block.out_rearrange(out)
    out = block.out_proj(out)
    return block.drop_output(out)


class AttentionControl:
    """Context manager routing every MONAI cross-attention block of ``network`` through a controller.

    Args:
        network: a module containing MONAI ``CrossAttentionBlock``s (e.g. a ``Denoiser``).
        controller: ``controller(probs, site) -> probs``, or a sequence applied in order.

    Raises:
        ModelError: if the network has no cross-attention block, uses features we do not
            reproduce (causal masks, relative position embeddings), or is already controlled.
    """

    def __init__(self, network: nn.Module, controller: AttentionController | Sequence[AttentionController]) -> None:
        self.network = network
        self.controller: AttentionController = (
            _Chain(controller) if isinstance(controller, (list, tuple)) else controller  # type: ignore[arg-type]
        )
        self._calls: dict[str, int] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._patched: list[tuple[nn.Module, Any]] = []
        self._hooks: list[Any] = []

    def _next_call(self, name: str) -> int:
        n = self._calls.get(name, 0)
        self._calls[name] = n + 1
        return n

    def _spatial_shape(self, name: str) -> tuple[int, ...] | None:
        # The block "a.b.transformer_blocks.0.attn2" belongs to the SpatialTransformer "a.b".
        owner = name.split(".transformer_blocks.")[0]
        return self._shapes.get(owner)

    def __enter__(self) -> AttentionControl:
        cls = _cross_attention_class()
        blocks = [(n, m) for n, m in self.network.named_modules() if isinstance(m, cls)]
        if not blocks:
            raise ModelError(f"{type(self.network).__name__} has no MONAI CrossAttentionBlock to control.")
        for name, m in blocks:
            if getattr(m, "_cfg_attention_controlled", False):
                raise ModelError(f"{name} is already under attention control; nested controls are not supported.")
            if m.causal or m.rel_positional_embedding is not None:
                raise ModelError(f"{name} uses causal/relative-position attention, which control does not reproduce.")
        try:
            for name, m in blocks:
                previous = m.__dict__.get("forward")  # an instance-level override, if any
                self._patched.append((m, previous))
                m.forward = types.MethodType(  # type: ignore[method-assign]
                    lambda blk, x, context=None, _n=name: _controlled_forward(blk, x, context, control=self, name=_n),
                    m,
                )
                m._cfg_attention_controlled = True
            for owner_name, owner in self.network.named_modules():
                if hasattr(owner, "transformer_blocks") and hasattr(owner, "proj_in"):
                    self._hooks.append(owner.register_forward_pre_hook(self._shape_hook(owner_name)))
        except BaseException:
            self._restore()
            raise
        return self

    def _shape_hook(self, owner_name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self._shapes[owner_name] = tuple(args[0].shape[2:])

        return hook

    def _restore(self) -> None:
        for m, previous in reversed(self._patched):
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous  # type: ignore[method-assign]
            m.__dict__.pop("_cfg_attention_controlled", None)
        self._patched.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __exit__(self, *exc: object) -> None:
        self._restore()
