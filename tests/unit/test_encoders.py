"""The packed CPU forward pass against Hugging Face's own BertModel."""

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from bitinglip.platform.tasks.encoders import SHORT_ROW_TOKENS, PackedEncoder


@pytest.fixture(scope="module")
def bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def reference(model: BertModel, ids: list[list[int]], pooling: str) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for row in ids:  # one row at a time: no padding anywhere
            h = model(input_ids=torch.tensor([row])).last_hidden_state[0]
            out.append({"mean": h.mean(0), "cls": h[0], "max": h.max(0).values, "lasttoken": h[-1]}[pooling])
    return torch.stack(out)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "lasttoken"])
@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_packed_matches_bert_model(bert: BertModel, pooling: str, order: str) -> None:
    rng = np.random.default_rng(1)
    lengths = sorted([int(n) for n in rng.integers(1, 40, size=25)] + [7, 7, 7])  # with runs of equal length
    if order == "shuffled":
        rng.shuffle(lengths)
    ids = [[int(t) for t in rng.integers(0, 120, size=n)] for n in lengths]
    packed = PackedEncoder(bert)
    with torch.no_grad():
        got = packed.pool(ids, pooling)
    want = reference(bert, ids, pooling)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_supports_only_float32_bert(bert: BertModel) -> None:
    assert PackedEncoder.supports(bert)
    assert not PackedEncoder.supports(BertModel(bert.config).to(torch.float64))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_medium_precision_multiplies_in_bfloat16_and_stays_close(bert: BertModel, pooling: str) -> None:
    rng = np.random.default_rng(2)
    ids = [[int(t) for t in rng.integers(0, 120, size=int(n))] for n in rng.integers(1, 40, size=30)]
    packed = PackedEncoder(bert, "medium")
    assert {layer[0].dtype for layer in packed.layers} == {torch.bfloat16}  # the products' weights, in bfloat16
    with torch.no_grad():
        got = packed.pool(ids, pooling)
        exact = PackedEncoder(bert, "highest").pool(ids, pooling)
    want = reference(bert, ids, pooling)
    assert got.dtype == torch.float32
    assert torch.allclose(exact, want, atol=1e-5)
    short = torch.tensor([len(row) <= SHORT_ROW_TOKENS for row in ids])
    assert 0 < int(short.sum()) < len(ids)
    assert torch.allclose(got[short], exact[short], atol=1e-6)  # short rows run in float32
    assert not torch.equal(got[~short], exact[~short])  # the others' products really ran in bfloat16
    cos = torch.nn.functional.cosine_similarity(got, want)
    assert float(cos.min()) > 0.999, float(cos.min())


def test_unknown_matmul_precision_is_refused(bert: BertModel) -> None:
    with pytest.raises(ValueError, match="matmul precision 'low'"):
        PackedEncoder(bert, "low")


def test_bfloat16_products_meet_a_bounded_set_of_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN keeps a kernel per input shape; a worker that met every row
    count up to the token budget grew by hundreds of MB.  The blocked product
    gives the same numbers on a handful of shapes."""
    from bitinglip.platform.tasks import encoders

    monkeypatch.setattr(encoders, "ROW_BLOCK", 128)
    monkeypatch.setattr(encoders, "ROW_QUANTUM", 32)
    seen: set[tuple[int, ...]] = set()

    def op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *_: object) -> torch.Tensor:
        seen.add(tuple(x.shape))
        return torch.nn.functional.linear(x, w, b)

    torch.manual_seed(0)
    w, b = torch.randn(24, 16), torch.randn(24)
    for rows in [*range(1, 300), 512, 1000]:
        x = torch.randn(rows, 16)
        got = encoders._blocked(op, x, w, b)
        assert got.shape == (rows, 24)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b))
    assert {s[0] for s in seen} == {32, 64, 96, 128}
