"""The deployment files, checked offline: the compose file's services,
volumes, GPUs and commands (parsed by our own CLI), the Dockerfile's user,
Prometheus, Alertmanager and Grafana files, and that every metric they use
is one that BitingLip or Dask exports.  promtool and amtool (Debian packages
prometheus and prometheus-alertmanager) also check and unit-test the rules
where they are installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bitinglip.cli import build_parser
from bitinglip.gateway.metrics import Metrics
from bitinglip.platform.ops.opsmetrics import Figures

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
APP_SERVICES = {"scheduler", "worker-0", "worker-1", "gateway"}
#: Dask's own series that our rules and dashboard use
DASK_METRICS = {"up", "dask_scheduler_workers"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_compose_services_volumes_and_gpus(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == APP_SERVICES | {"redis", "prometheus", "alertmanager", "grafana"}
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                if not source.startswith("./deploy/secrets/"):  # made by the operator (deploy/secrets/README.md)
                    assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
    for name in APP_SERVICES:
        svc = services[name]
        assert svc["build"] == "." and svc["image"] == "bitinglip:latest"
        assert "model-cache:/data/models" in svc["volumes"] and "results:/data/results" in svc["volumes"]
        assert svc["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert svc["environment"]["MODEL_CACHE_DIR"] == "/data/models"
    gpus = []
    for name in ("worker-0", "worker-1"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        gpus += device["device_ids"]
        assert services[name]["depends_on"]["scheduler"]["condition"] == "service_healthy"
    assert sorted(gpus) == ["0", "1"]  # each replica its own GPU
    assert "${BITINGLIP_JWT_SECRET:?" in services["gateway"]["environment"]["BITINGLIP_JWT_SECRET"]


def test_compose_commands_are_valid_bitinglip_commands(compose: dict[str, Any]) -> None:
    parser = build_parser()
    commands = {}
    for name in APP_SERVICES:
        cmd = compose["services"][name]["command"]
        assert cmd[0] == "bitinglip"
        commands[name] = parser.parse_args(cmd[1:])  # argparse exits (SystemExit) on anything unknown
    assert commands["scheduler"].command == "scheduler" and commands["scheduler"].port == 8786
    assert commands["worker-0"].scheduler == "tcp://scheduler:8786" and commands["worker-0"].gpus == 1
    assert commands["gateway"].scheduler == "tcp://scheduler:8786" and commands["gateway"].host == "0.0.0.0"
    published = {name: {p.split(":")[1] for p in svc.get("ports", [])} for name, svc in compose["services"].items()}
    assert commands["scheduler"].dashboard_address.endswith(":8787") and "8787" in published["scheduler"]
    assert str(commands["gateway"].port) in published["gateway"]


def test_dockerfile_runs_unprivileged() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    users = [i for i, line in enumerate(lines) if line.startswith("USER ")]
    assert users, "no USER in the Dockerfile"
    last_user = lines[users[-1]].split()[1].split(":")[0]
    assert last_user not in ("root", "0")
    assert all(not line.startswith("RUN ") for line in lines[users[-1]:]), "RUN after USER runs as the user"
    assert re.search(rf"useradd .*{last_user}", "\n".join(lines))


def _exported_metrics() -> set[str]:
    names = {fam.name for fam in Figures().families()}
    gateway = Metrics()
    gateway.observe("GET", "/health", 200, 0.01)
    names |= {line.split("{")[0].split(" ")[0] for line in gateway.render({"queued": 0}).splitlines()
              if not line.startswith("#")}
    return names | DASK_METRICS


def _used_metrics(exprs: list[str]) -> set[str]:
    found = set()
    for expr in exprs:
        found |= set(re.findall(r"\b((?:bitinglip|dask)_[a-z_]+|up)\b(?=\s*[{\[)=<>/ *+\-]|\s*$)", expr))
    return found


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_cover_the_issue_and_use_exported_metrics() -> None:
    rules = _rules()
    names = {r["alert"] for r in rules}
    assert {"BitingLipWorkerDown", "BitingLipJobFailing", "BitingLipQueueStalled", "BitingLipGPUMemoryHigh"} <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket") and rule["annotations"]["summary"]
    used = _used_metrics([r["expr"] for r in rules])
    assert used - _exported_metrics() == set()
    assert "bitinglip_jobs_finished_total" in used and "bitinglip_worker_gpu_memory_used_bytes" in used


def test_prometheus_and_alertmanager_configs(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prom["scrape_configs"]}
    assert targets == {"dask-scheduler": ["scheduler:8787"], "bitinglip-gateway": ["gateway:8000"]}
    for job in targets.values():
        host = job[0].split(":")[0]
        assert host in compose["services"]
    assert [Path(f).name for f in prom["rule_files"]] == ["alerts.yml"]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]

    am = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    receivers = {r["name"]: r for r in am["receivers"]}
    page = next(r for r in am["route"]["routes"] if 'severity = "page"' in r["matchers"])
    assert receivers[page["receiver"]]["pagerduty_configs"][0]["routing_key_file"]
    assert am["route"]["receiver"] in receivers


def test_grafana_dashboard_uses_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "bitinglip.json").read_text())
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert all(t["datasource"]["uid"] == uid for p in dash["panels"] for t in p["targets"])
    used = _used_metrics(exprs)
    assert used - _exported_metrics() == set()
    for wanted in ("bitinglip_model_rows_total", "bitinglip_model_tokens_total", "bitinglip_model_resident_bytes",
                   "bitinglip_model_load_seconds", "bitinglip_job_padding_ratio", "bitinglip_model_oom_splits_total",
                   "bitinglip_model_rows_in_error_total", "bitinglip_model_batches_total"):
        assert wanted in used, wanted


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.skip(reason=f"{name} is not installed (Debian package prometheus / prometheus-alertmanager)")
    return exe


def test_promtool_checks_and_unit_tests_the_rules(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    for args in (["check", "rules", str(DEPLOY / "alerts.yml")], ["test", "rules", str(DEPLOY / "alerts_test.yml")]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "token").write_text("x")
    config = (DEPLOY / "prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml", str(DEPLOY / "alerts.yml"))
    (tmp_path / "prometheus.yml").write_text(config.replace("/etc/prometheus/gateway-token", str(tmp_path / "token")))
    r = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_amtool_checks_the_alertmanager_config() -> None:
    amtool = _tool("amtool")
    r = subprocess.run([amtool, "check-config", str(DEPLOY / "alertmanager.yml")], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
