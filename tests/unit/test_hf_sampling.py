"""The transformers engine's per-row sampling (engines/hf_sampling.py): argmax
over scores plus keyed Gumbel noise must sample from softmax(logits / T), and
the filters must keep the tokens vLLM's would."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers.generation.continuous_batching", reason="needs transformers with continuous batching")

import torch

from bitinglip.platform.tasks.engines.hf_sampling import (
    RowGumbel,
    RowMinP,
    RowTemperature,
    RowTopK,
    RowTopP,
    noise_key,
)


def floats(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(torch.int32)


def test_argmax_of_scaled_logits_plus_keyed_noise_samples_the_softmax() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    temperature, draws = 2.0, 20000
    keys = torch.tensor([noise_key(seed, 0, 17) for seed in range(draws)], dtype=torch.int32)
    scores = RowTemperature()(logits.repeat(draws, 1), floats([temperature] * draws))
    picks = RowGumbel()(scores, keys).argmax(-1)
    observed = torch.bincount(picks, minlength=4).double() / draws
    expected = torch.softmax(logits.double() / temperature, -1)
    assert torch.allclose(observed, expected, atol=0.015), (observed, expected)


def test_the_noise_depends_on_the_key_alone() -> None:
    scores = torch.randn(3, 50)
    key = noise_key(7, 1, 30)
    alone = RowGumbel()(scores[1:2], torch.tensor([key], dtype=torch.int32))
    together = RowGumbel()(scores, torch.tensor([noise_key(1, 0, 5), key, -1], dtype=torch.int32))
    assert torch.equal(alone[0], together[1])
    assert torch.equal(together[2], scores[2])  # key -1: a greedy row, no noise
    assert noise_key(7, 0, 30) != key != noise_key(7, 1, 31)


def test_filters_keep_what_they_should() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3)
    scores = probs.log()

    def kept(out: torch.Tensor) -> list[list[int]]:
        return [torch.nonzero(row > -math.inf).flatten().tolist() for row in out]

    assert kept(RowTopK()(scores, torch.tensor([2, 0, 9], dtype=torch.int32))) == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert kept(RowTopP()(scores, floats([0.7, 0.9, 1.0]))) == [[0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert kept(RowMinP()(scores, floats([0.5, 0.2, 0.0]))) == [[0, 1], [0, 1, 2], [0, 1, 2, 3]]
