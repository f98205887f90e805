"""Per-row sampling for transformers' continuous batching.

The manager samples with one ``do_sample`` and one global torch generator for
all its requests, so a row's draw depends on whatever else shares the batch:
no per-row seed, and greedy and sampled rows would need two managers.  We run
the manager greedy (argmax) and put the randomness in the logits instead:
each row's temperature, top-k, top-p and min-p filter its scores, then
Gumbel noise drawn from a hash of (seed, completion, position) is added, and
argmax of ``logits / T + Gumbel`` is a sample from ``softmax(logits / T)``
(the Gumbel-max trick).  A row's noise depends on nothing but its own seed
and position, so the same seed gives the same text whatever else runs.
Greedy rows get temperature 1, no filter and no noise: plain argmax.

Each processor holds one int32 slot per row (the manager's layout for
per-request processors); floats travel bit-cast, as the manager's own do.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

#: request keyword arguments the processors read (names prefixed so none collides with the manager's own)
TEMPERATURE, TOP_K, TOP_P, MIN_P, SEED = "bl_temperature", "bl_top_k", "bl_top_p", "bl_min_p", "bl_seed"
#: the completion's index among a row's ``n``, so completions of one seed differ
COMPLETION = "bl_completion"
_MASK32 = 0xFFFFFFFF


def _floats(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(torch.int32)


class _RowProcessor(ContinuousBatchingLogitsProcessor):
    key: str
    default: Any
    supported_kwargs: ClassVar[dict[str, type]] = {}
    ignored_kwargs: ClassVar[tuple[str, ...]] = ()

    def values(self, requests: list[Any]) -> list[Any]:
        return [r.state.logit_processor_kwargs.get(self.key, self.default) for r in requests]

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(self._default_tensor(int32_tensor))

    def _default_tensor(self, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RowTemperature(_RowProcessor):
    key, default = TEMPERATURE, 1.0
    supported_kwargs: ClassVar[dict[str, type]] = {TEMPERATURE: float}

    def _default_tensor(self, like: torch.Tensor) -> torch.Tensor:
        return torch.full(like.shape, 1.0, dtype=torch.float32).view(torch.int32)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        return _floats(self.values(requests_with_new_token))

    def __call__(self, scores: torch.FloatTensor, tensor_arg: torch.Tensor) -> torch.FloatTensor:
        return scores / tensor_arg[: scores.size(0)].view(torch.float32).unsqueeze(-1)


class RowTopK(_RowProcessor):
    key, default = TOP_K, 0
    supported_kwargs: ClassVar[dict[str, type]] = {TOP_K: int}

    def _default_tensor(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(like.shape, dtype=torch.int32)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        return torch.tensor(self.values(requests_with_new_token), dtype=torch.int32)

    def __call__(self, scores: torch.FloatTensor, tensor_arg: torch.Tensor) -> torch.FloatTensor:
        k = tensor_arg[: scores.size(0)].to(torch.int64)
        k = torch.where(k <= 0, scores.size(-1), k.clamp(max=scores.size(-1)))  # 0: no top-k
        kth = torch.sort(scores, dim=-1, descending=True)[0].gather(-1, (k - 1).unsqueeze(-1))
        return scores.masked_fill(scores < kth, -float("inf"))


class RowTopP(_RowProcessor):
    key, default = TOP_P, 1.0
    supported_kwargs: ClassVar[dict[str, type]] = {TOP_P: float}

    def _default_tensor(self, like: torch.Tensor) -> torch.Tensor:
        return torch.full(like.shape, 1.0, dtype=torch.float32).view(torch.int32)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        return _floats(self.values(requests_with_new_token))

    def __call__(self, scores: torch.FloatTensor, tensor_arg: torch.Tensor) -> torch.FloatTensor:
        top_p = tensor_arg[: scores.size(0)].view(torch.float32).unsqueeze(-1)
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1] = False  # the most likely token always stays
        drop &= top_p < 1  # top_p 1 keeps everything, even tokens whose probability rounds to 0
        return scores.masked_fill(drop.scatter(-1, order, drop), -float("inf"))


class RowMinP(_RowProcessor):
    key, default = MIN_P, 0.0
    supported_kwargs: ClassVar[dict[str, type]] = {MIN_P: float}

    def _default_tensor(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(like.shape, dtype=torch.float32).view(torch.int32)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        return _floats(self.values(requests_with_new_token))

    def __call__(self, scores: torch.FloatTensor, tensor_arg: torch.Tensor) -> torch.FloatTensor:
        min_p = tensor_arg[: scores.size(0)].view(torch.float32).unsqueeze(-1)
        probs = scores.softmax(dim=-1)
        keep = probs >= min_p * probs.max(dim=-1, keepdim=True).values
        return scores.masked_fill(~keep & (min_p > 0), -float("inf"))


def noise_key(seed: int, completion: int, position: int) -> int:
    """A 31-bit key for one row's noise at one position; -1 is kept for "no noise"."""
    digest = hashlib.blake2b(f"{seed}:{completion}:{position}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class RowGumbel(_RowProcessor):
    """Adds Gumbel noise keyed per row and position; rows without a seed
    (greedy ones) get none."""

    key, default = SEED, None
    supported_kwargs: ClassVar[dict[str, type]] = {SEED: int, COMPLETION: int}

    def _default_tensor(self, like: torch.Tensor) -> torch.Tensor:
        return torch.full(like.shape, -1, dtype=torch.int32)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        keys = []
        for r in requests_with_new_token:
            kwargs, state = r.state.logit_processor_kwargs, r.state
            seed = kwargs.get(SEED)
            # prompt + generated stays the same when the manager moves a request's tokens into its prompt (offload)
            position = len(state.initial_tokens) + state.generated_len()
            keys.append(-1 if seed is None else noise_key(seed, kwargs.get(COMPLETION, 0), position))
        return torch.tensor(keys, dtype=torch.int32)

    def __call__(self, scores: torch.FloatTensor, tensor_arg: torch.Tensor) -> torch.FloatTensor:
        keys = tensor_arg[: scores.size(0)].to(torch.int64).to(scores.device)
        vocab = torch.arange(scores.size(-1), dtype=torch.int64, device=scores.device)
        # lowbias32 hash of (key, token): int64 products wrap, and the low 32 bits we keep are exact
        x = (keys.unsqueeze(-1) * 0x9E3779B1 + vocab) & _MASK32
        x ^= x >> 16
        x = (x * 0x7FEB352D) & _MASK32
        x ^= x >> 15
        x = (x * 0x846CA68B) & _MASK32
        x ^= x >> 16
        uniform = (x.to(torch.float64) + 0.5) / 2**32
        gumbel = (-torch.log(-torch.log(uniform))).to(scores.dtype)
        return scores + gumbel * (keys >= 0).unsqueeze(-1).to(scores.dtype)


def row_sampling_processors() -> ContinuousBatchingLogitsProcessorList:
    """The processor list to put on a manager in place of the one it builds
    from its generation config (which we keep empty: greedy)."""
    processors = [RowTemperature(), RowTopK(), RowTopP(), RowMinP(), RowGumbel()]
    wrapped = ContinuousBatchingLogitsProcessorList(LogitsProcessorList(processors), per_request_processors=False)
    # one int32 slot per processor; the manager counts slots only for processors it converts itself
    wrapped.tensors_required = len(processors)
    return wrapped
