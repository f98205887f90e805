"""The client counts GPUs without importing torch where the machine has no GPU driver."""

import subprocess
import sys
from pathlib import Path

import pytest

from bitinglip.platform.cluster.local import _gpu_device_files


@pytest.mark.skipif(not sys.platform.startswith("linux") or _gpu_device_files(),
                    reason="needs a Linux machine without GPU device files")
def test_no_gpu_driver_means_no_gpus_and_no_torch_import() -> None:
    code = ("import sys; from bitinglip.platform.cluster.local import gpu_count; "
            "print(gpu_count(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=300).stdout.split()
    assert out == ["0", "False"]
