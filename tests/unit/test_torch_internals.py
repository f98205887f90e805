"""The private torch API BitingLip uses, against the installed torch: an
upgrade that renames or reshapes it fails here, not as a silent fallback
to the slower bfloat16 product."""

from __future__ import annotations

import platform

import pytest
import torch

from bitinglip.platform.tasks.encoders import _bf16_linear
from bitinglip.platform.tasks.torch_internals import onednn_linear

X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(not (X86 and torch.backends.mkldnn.is_available()),
                    reason="oneDNN's linear kernel is checked on x86 CPU builds")
def test_onednn_linear_exists() -> None:
    assert onednn_linear() is not None, "torch.ops.mkldnn._linear_pointwise is gone: see torch_internals.py"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # oneDNN has no bfloat16 inner product on this CPU (no AVX512-BF16 or AMX): the encoder's probe must see
        # that and take F.linear, never fail a job
        assert not _bf16_linear().onednn


@pytest.mark.skipif(not (X86 and torch.backends.mkldnn.is_available()
                         and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="needs oneDNN's bfloat16 inner product: an x86 CPU with AVX512-BF16 or AMX")
def test_onednn_linear_computes_a_bfloat16_linear() -> None:
    linear = onednn_linear()
    assert linear is not None
    torch.manual_seed(0)
    x, weight, bias = torch.randn(5, 8), torch.randn(3, 8), torch.randn(3)
    got = linear(x.bfloat16(), weight.bfloat16().contiguous(), bias.bfloat16())
    assert got.dtype == torch.bfloat16 and got.shape == (5, 3)
    want = x.bfloat16().float() @ weight.bfloat16().float().T + bias.bfloat16().float()
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.02)
    assert _bf16_linear().onednn  # the encoder takes it


def test_without_the_kernel_the_encoder_falls_back_to_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitinglip.platform.tasks import encoders

    monkeypatch.setattr(encoders, "onednn_linear", lambda: None)
    fallback = encoders._bf16_linear()
    assert not fallback.onednn
    w, b = fallback.prepare(torch.ones(2, 3), torch.zeros(2))
    assert torch.equal(fallback(torch.ones(1, 3), w, b), torch.full((1, 2), 3.0, dtype=torch.bfloat16))
