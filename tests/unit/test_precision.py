"""How the embed task picks the precision of its matrix products."""

import pytest

from bitinglip.errors import InputError
from bitinglip.platform.tasks.builtin import Embed
from bitinglip.platform.tasks.precision import matmul_precision, native_bf16


def test_explicit_choices_are_kept_everywhere() -> None:
    for device in ("cpu", "cuda:0"):
        assert matmul_precision("highest", device, "float32") == "highest"
        assert matmul_precision("medium", device, "float32") == "medium"


def test_auto_uses_bfloat16_products_only_for_float32_models_on_a_cpu_that_has_them() -> None:
    expected = "medium" if native_bf16() else "highest"
    assert matmul_precision("auto", "cpu", "float32") == expected
    assert matmul_precision("auto", "cuda:0", "float32") == "highest"
    assert matmul_precision("auto", "cpu", "int8") == "highest"
    assert matmul_precision("auto", "cpu", "bfloat16") == "highest"


def test_native_bf16_reads_the_cpu_flags() -> None:
    with open("/proc/cpuinfo") as fh:
        flags = next(line for line in fh if line.startswith("flags")).split()
    assert native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_embed_option_is_checked_on_the_client() -> None:
    assert Embed().check_options({})["matmul_precision"] == "auto"
    with pytest.raises(InputError, match="matmul_precision='low'.*auto, highest, medium"):
        Embed().check_options({"matmul_precision": "low"})
