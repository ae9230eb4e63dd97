"""The decode loop's KV cache: allocated once per generation and compacted in place.

transformers' `DynamicLayer` appends by `torch.cat` (a copy of the whole layer cache every forward) and
the loop's compaction used `index_select` (another copy). `PreallocatedLayer` keeps each layer's keys
and values in buffers with spare room: a forward writes its rows in place, compaction moves only the
accepted rows down in place, and `keys`/`values` are views of the filled part. The buffers double when
full, so the cost per step no longer grows with the cache length. `with_cache` passes a cache to a forward
under the argument name of the installed transformers.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


@functools.lru_cache(maxsize=None)
def _cache_arg(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """The keyword arguments that hand `cache` to `model`'s forward under the name the installed transformers
    takes: `cache` from 5.24 on (where `past_key_values` is deprecated, with a FutureWarning on every forward,
    and 5.40 removes it), `past_key_values` before. The one place the loop names it."""
    return {_cache_arg(type(model).forward): cache, "use_cache": True}


class PreallocatedLayer(DynamicLayer):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.n = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, _ = key_states.shape
        self.kbuf = key_states.new_empty(b, h, self.capacity, key_states.shape[-1])
        self.vbuf = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self.kbuf[:, :, : self.n], self.vbuf[:, :, : self.n]

    def _grow(self, need: int) -> None:
        self.capacity = max(need, 2 * self.capacity)
        for name in ("kbuf", "vbuf"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], self.capacity, old.shape[-1])
            new[:, :, : self.n] = old[:, :, : self.n]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        if self.n + t > self.capacity:
            self._grow(self.n + t)
        self.kbuf[:, :, self.n : self.n + t] = key_states
        self.vbuf[:, :, self.n : self.n + t] = value_states
        self.n += t
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n if self.is_initialized else 0

    def keep(self, n_prefix: int, rows: torch.Tensor | None, n_rows: int) -> None:
        """Keep positions [0, n_prefix) and then n_prefix + rows, in order (rows None: the first n_rows)."""
        if rows is not None:  # gathered into a small temporary first: source and destination overlap
            self.kbuf[:, :, n_prefix : n_prefix + n_rows] = self.kbuf[:, :, n_prefix + rows]
            self.vbuf[:, :, n_prefix : n_prefix + n_rows] = self.vbuf[:, :, n_prefix + rows]
        self.n = n_prefix + n_rows
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.is_initialized:
            self.n = max(0, self.n + tokens_to_remove)
            self._views()
        elif tokens_to_remove > 0:
            super().crop(tokens_to_remove)  # raises, as transformers does

    def reset(self) -> None:
        self.n = 0
        if self.is_initialized:
            self._views()


def new_cache(config, capacity: int) -> DynamicCache:
    """A DynamicCache whose attention layers are preallocated for `capacity` positions. Sliding-window layers
    too: they keep every position like the others, so every layer's cache has the same columns (the loop's
    compaction and block mask index them alike) and the window is applied by the mask (`layer_masks`)."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                    for layer in cache.layers]
    return cache


def layer_masks(config, mask: torch.Tensor, positions: torch.Tensor, cache_len: int):
    """The loop's 4-D additive mask as the model takes it: as is, or for a model with sliding-window layers
    (Gemma 3), one mask per layer type, the sliding layers' also hiding keys `sliding_window` or more positions
    behind the query (transformers hands a prepared 4-D mask to every layer unchanged). The mask's rows are
    the fed rows at `positions` (T,); its columns are the `cache_len` cached positions 0.. and then those rows."""
    window = getattr(config, "sliding_window", None)
    if not window or "sliding_attention" not in set(getattr(config, "layer_types", None) or ()):
        return mask
    k_pos = torch.cat([torch.arange(cache_len, device=positions.device), positions])
    far = (positions[:, None] - k_pos[None, :]) >= window
    return {"full_attention": mask, "sliding_attention": mask.masked_fill(far, torch.finfo(mask.dtype).min)}


def keep_rows(cache, n_prefix: int, block_rows: list[int]) -> None:
    """Keep cache positions [0, n_prefix) and then n_prefix + block_rows (in order), in every layer."""
    n = len(block_rows)
    chain = block_rows == list(range(n))  # a chain prefix: plain truncation, nothing moves
    rows = None if chain else torch.tensor(block_rows, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        if isinstance(layer, PreallocatedLayer):
            layer.keep(n_prefix, rows, n)
        elif chain:
            layer.keys, layer.values = layer.keys[:, :, : n_prefix + n], layer.values[:, :, : n_prefix + n]
        else:
            idx = torch.cat([torch.arange(n_prefix, device=rows.device), rows + n_prefix])
            layer.keys, layer.values = layer.keys.index_select(2, idx), layer.values.index_select(2, idx)
