"""Gateways come and go; the cluster and Redis keep the truth.

Two gateways sharing Redis answer the same and share rate limits; a gateway
killed mid-job is replaced and reports the job's true end; TLS works with a
certificate made here."""

from __future__ import annotations

import datetime
import ipaddress
import signal
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from gwtools import auth, free_port, serve, start_gateway, wait_for

from bitinglip.settings import Settings

pytestmark = pytest.mark.slow


def test_two_gateways_share_status_and_rate_limits(gateway: str, gw_settings: Settings,
                                                   models: dict[str, str]) -> None:
    with serve(gw_settings.with_(trusted_proxies=())) as other:
        h = auth("shared-user")
        r = httpx.post(f"{gateway}/v1/jobs", headers=h, timeout=60,
                       json={"task": "embed", "model": "tiny-encoder", "inputs": ["a", "b", "c"]})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        done = wait_for(lambda: httpx.get(f"{other}/v1/jobs/{job_id}", headers=h).json())
        assert done["state"] == "succeeded"
        assert httpx.get(f"{gateway}/v1/jobs/{job_id}", headers=h).json()["state"] == "succeeded"
        rows = httpx.get(f"{other}/v1/jobs/{job_id}/results", headers=h).json()["rows"]
        assert len(rows) == 3

        body = {"task": "embed", "model": "tiny-encoder", "inputs": ["a"]}  # valid: invalid ones are not counted
        h2 = auth("limited-user")
        codes = [httpx.post(f"{url}/v1/jobs", headers=h2, json=body, timeout=60).status_code
                 for url in [gateway, other] * 5]
        assert codes == [202] * 10
        assert httpx.post(f"{other}/v1/jobs", headers=h2, json=body).status_code == 429
        assert httpx.post(f"{gateway}/v1/jobs", headers=h2, json=body).status_code == 429

        # this one trusts no proxy: a forged X-Forwarded-For changes nothing
        admin = {**auth("root", "admin"), "X-Forwarded-For": "203.0.113.9"}
        assert httpx.get(f"{other}/admin/jobs", headers=admin).status_code == 200


def test_gateway_killed_mid_job_then_restarted(gw_settings: Settings, platform: Any, models: dict[str, str],
                                               tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    scheduler = platform.client.scheduler.address
    h = auth("restart-user")
    first = start_gateway(port, gw_settings, scheduler, tmp_path / "gateway.log")
    try:
        texts = [f"sentence number {i} with a few more words in it" for i in range(4000)]
        r = httpx.post(f"{url}/v1/jobs", headers=h, timeout=120,
                       json={"task": "embed", "model": "tiny-encoder", "inputs": texts})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    second = start_gateway(port, gw_settings, scheduler, tmp_path / "gateway.log")
    try:
        done = wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", headers=h, timeout=30).json(), timeout=300)
        assert done["state"] == "succeeded", done
        assert done["rows_done"] == done["rows_total"] == 4000
        page = httpx.get(f"{url}/v1/jobs/{job_id}/results?offset=3990&limit=100", headers=h, timeout=30).json()
        assert [row["id"] for row in page["rows"]] == list(range(3990, 4000))
    finally:
        second.terminate()
        second.wait(30)


def _self_signed(directory: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls(gw_settings: Settings, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with serve(gw_settings, ssl=(cert, key)) as url:
        assert url.startswith("https://")
        trust = ssl.create_default_context(cafile=cert)
        health = httpx.get(f"{url}/health", verify=trust, timeout=30)
        assert health.status_code == 200 and health.json()["components"]["gateway"]["tls"] is True
        assert httpx.get(f"{url}/v1/jobs", headers=auth("tls-user"), verify=trust).status_code == 200
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
            httpx.get(f"{url}/health/live")
        with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
            httpx.get(url.replace("https://", "http://") + "/health/live")
