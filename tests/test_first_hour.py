"""Issue 13, "the first hour": what a new user following the README meets
first — the example as a script, the demo run twice, `bitinglip up` after
`down`, CLI errors before a cluster starts, and the smaller rough edges."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bitinglip.platform.cluster.stack import _jwt_secret, port_free
from bitinglip.settings import Settings


def test_a_port_in_time_wait_is_free_for_up() -> None:
    """`up` right after `down`: the old connections of a port linger in
    TIME_WAIT for about 60 s; the servers bind with SO_REUSEADDR, so the
    check must too."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
        client.close()
    assert port_free("127.0.0.1", port)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert not port_free("127.0.0.1", busy.getsockname()[1])


def test_up_signs_with_an_exported_secret() -> None:
    assert _jwt_secret(Settings(jwt_secret="exported-secret")) == "exported-secret"
    fresh = _jwt_secret(Settings(jwt_secret=None))
    assert len(fresh) >= 32 and fresh != _jwt_secret(Settings(jwt_secret=None))


REPO = Path(__file__).resolve().parents[1]


def _make_demo(cwd: Path) -> subprocess.CompletedProcess[str]:
    # the venv the tests run in; -o: it is set up already, make must not install into it
    venv = Path(sys.executable).parent.parent
    return subprocess.run(["make", "-f", str(REPO / "Makefile"), "-o", f"{venv}/.installed", "demo",
                           f"VENV={venv}", "ROWS=200"], cwd=cwd, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.slow
def test_make_demo_runs_again(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("no make on PATH (apt-get install make)")
    first = _make_demo(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    time.sleep(1)  # a new second, as between two demos a user starts by hand
    second = _make_demo(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]  # was: "holds the results of another job"
    outputs = sorted((tmp_path / "bitinglip-output").glob("demo-*"))
    assert len(outputs) == 2
    for out in outputs:
        assert json.loads((out / "_manifest.json").read_text())["rows_out"] == 200


def _script(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(path), *args], cwd=path.parent, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.slow
def test_the_readme_example_runs_as_a_script(tmp_path: Path) -> None:
    script = tmp_path / "quickstart.py"
    shutil.copy(REPO / "examples" / "quickstart.py", script)  # as copied out of the README
    proc = _script(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 rows, embeddings of 384 dimensions" in proc.stdout, proc.stdout


def test_a_script_without_the_main_guard_gets_a_one_line_hint(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text("import bitinglip\n\n"
                      "with bitinglip.connect(n_workers=1) as platform:\n"
                      "    print(platform.submit('embed', model='all-MiniLM-L6-v2', inputs=['a']).result())\n")
    proc = _script(script)
    assert proc.returncode != 0
    hint = ('bitinglip.errors.ConfigError: bitinglip.connect() without an address starts worker processes '
            'that import unguarded.py again: put the code that calls it under `if __name__ == "__main__":` '
            '(see examples/quickstart.py)')
    assert hint in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert len((proc.stdout + proc.stderr).splitlines()) < 20  # was about 490 lines of worker tracebacks


def test_connect_to_an_unresolvable_host_fails_fast_naming_it() -> None:
    import bitinglip
    from bitinglip.errors import UnavailableError

    started = time.monotonic()
    with pytest.raises(UnavailableError, match=r"cannot reach the scheduler at tcp://no-such-host\.invalid:8786"):
        bitinglip.connect("tcp://no-such-host.invalid:8786")
    assert time.monotonic() - started < 15  # was a bare OSError after 30 s


def test_models_add_from_the_hub_without_a_network_fails_fast_with_a_hint(tmp_path: Path) -> None:
    # an endpoint that never resolves: the same as a machine without a network, and never reaches one
    env = {**os.environ, "HF_ENDPOINT": "https://hub.invalid", "MODEL_CACHE_DIR": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bitinglip", "models", "add", "m", "hf://org/name@abc123",
                           "--task", "embed"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert time.monotonic() - started < 30  # the hub client alone retried for about 23 s
    assert proc.returncode == 1
    assert "cannot reach the Hugging Face Hub at https://hub.invalid" in proc.stderr
    assert "set HF_HUB_OFFLINE=1 to read the local hub cache" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_bar_ends_on_the_figures_progress_returns(platform: Any, tiny_encoder: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    job = platform.submit("embed", model=str(tiny_encoder), inputs=[f"row {i}" for i in range(40)])
    final = job.progress()
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.state == "succeeded" and final.rows_done == 40
    assert "40/40 [" in last and f"{final.rows_per_s:.1f} rows/s" in last, last  # was tqdm's own rate
    assert job.progress(wait=False) == final  # and it stays that figure


@pytest.mark.slow
def test_a_notebook_without_ipywidgets_gets_one_progress_line(platform: Any, tiny_encoder: Path,
                                                             tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (the dev extra has it)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (the dev extra has it)")
    address = platform.client.scheduler.address
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import sys\nsys.modules['ipywidgets'] = None  # as where it is not installed"),
        nbformat.v4.new_code_cell(f"import bitinglip\nplatform = bitinglip.connect({address!r})"),
        nbformat.v4.new_code_cell(f"job = platform.submit('embed', model={str(tiny_encoder)!r}, "
                                  "inputs=['a', 'b', 'c', 'd'])\n_ = job.progress()"),
        nbformat.v4.new_code_cell("platform.close()"),
    ])
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ})
    outputs = nb.cells[2].outputs
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) == 1 and "4/4 rows" in lines[0] and "(succeeded)" in lines[0], text  # was about 40 lines
