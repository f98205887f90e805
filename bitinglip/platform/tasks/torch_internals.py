"""The one private torch API BitingLip uses, in one place.

``torch.ops.mkldnn._linear_pointwise`` is oneDNN's linear kernel, the one
torch.compile's CPU backend calls: with bfloat16 inputs it runs about 2x
faster than ``F.linear`` on CPUs with AVX512-BF16 or AMX (see
``encoders.py``).  torch documents no public entry to it.  An upgrade that
renames it or changes its arguments fails tests/unit/test_torch_internals.py
on x86 builds, instead of silently falling back to the slower product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Linear = Callable[[Any, Any, Any], Any]


def onednn_linear() -> Linear | None:
    """``linear(x, weight, bias) -> x @ weight.T + bias`` on oneDNN's kernel
    (no fused post-op); None where this torch build has none."""
    import torch

    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):  # no oneDNN in this build, or the op is gone
        return None

    def linear(x: Any, weight: Any, bias: Any) -> Any:
        # the post-op "none" with no scalars and no algorithm: a plain linear
        return op(x, weight, bias, "none", [], "")

    return linear
