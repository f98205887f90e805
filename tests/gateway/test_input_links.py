"""A directory ``input_uri`` through REST reads nothing outside
``BITINGLIP_INPUT_DIR``, not even through a link inside it (issue 14.3)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pandas as pd
from gwtools import auth, get_json, serve, wait_for

from bitinglip.settings import Settings


def test_a_link_out_of_the_input_dir_is_refused_over_rest(gw_settings: Settings, models: dict[str, str],
                                                          tmp_path: Path) -> None:
    root, outside = tmp_path / "inputs", tmp_path / "elsewhere"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    pd.DataFrame({"id": ["a", "b"], "text": ["one", "two"]}).to_parquet(root / "data" / "part-0.parquet")
    pd.DataFrame({"id": ["s1"], "text": ["secret"]}).to_parquet(outside / "secret.parquet")
    (root / "data" / "part-1.parquet").symlink_to(outside / "secret.parquet")
    h = auth("links-user")
    with serve(gw_settings.with_(input_dir=root.resolve())) as url:
        r = httpx.post(f"{url}/v1/jobs", headers=h, timeout=60,
                       json={"task": "embed", "model": "tiny-encoder", "input_uri": "file://data"})
        assert r.status_code == 422, r.text
        assert "part-1.parquet" in r.text and "outside the input directory" in r.text
        (root / "data" / "part-1.parquet").unlink()
        r = httpx.post(f"{url}/v1/jobs", headers=h, timeout=60,
                       json={"task": "embed", "model": "tiny-encoder", "input_uri": "file://data"})
        assert r.status_code == 202, r.text
        job = wait_for(lambda: get_json(f"{url}/v1/jobs/{r.json()['id']}", h))
        assert job["state"] == "succeeded" and job["rows_total"] == 2
