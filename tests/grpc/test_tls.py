"""TLS and client-certificate authentication, with certificates made by the openssl CLI for the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from client import SegmentClient, SegmentError
from client.cli import main as cli_main
from client.security import tls_credentials
from server.settings import Settings
from tests.helpers.certs import openssl, start


@pytest.fixture(scope="module")
def tls_server(certs: Path) -> Iterator[str]:
    server = start(certs, client_ca=False)
    yield f"localhost:{server.port}"
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(certs: Path) -> Iterator[str]:
    server = start(certs, client_ca=True)
    yield f"localhost:{server.port}"
    server.stop()


def test_tls_with_the_ca_file(tls_server: str, certs: Path, jpeg_bytes: bytes) -> None:
    with SegmentClient(tls_server, credentials=tls_credentials(certs / "ca.pem")) as client:
        assert client.segment(jpeg_bytes).width == 160


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_server: str) -> None:
    with SegmentClient(tls_server, timeout=5) as client, pytest.raises(SegmentError) as info:
        client.model_info(timeout=5)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server: str, certs: Path, tmp_path: Path) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            "other.key", "-out", "other.pem", "-days", "1", "-subj", "/CN=other", cwd=tmp_path)  # fmt: skip
    untrusting = tls_credentials(tmp_path / "other.pem")
    with SegmentClient(tls_server, timeout=5, credentials=untrusting) as client, pytest.raises(SegmentError) as info:
        client.model_info(timeout=5)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_required_when_a_client_ca_is_set(mtls_server: str, certs: Path, jpeg_bytes: bytes) -> None:
    without = tls_credentials(certs / "ca.pem")
    with SegmentClient(mtls_server, timeout=5, credentials=without) as client, pytest.raises(SegmentError) as info:
        client.segment(jpeg_bytes)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with_cert = tls_credentials(certs / "ca.pem", certs / "client.pem", certs / "client.key")
    with SegmentClient(mtls_server, credentials=with_cert) as client:
        assert client.segment(jpeg_bytes).width == 160


def test_cli_takes_a_ca_file_and_a_client_certificate(
    mtls_server: str, certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = ["--ca-file", str(certs / "ca.pem"), "--cert", str(certs / "client.pem"), "--key", str(certs / "client.key")]
    assert cli_main(["--target", mtls_server, *tls, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert (
        cli_main(
            ["--target", mtls_server, "--ca-file", str(certs / "ca.pem"), "--cert", str(certs / "client.pem"), "health"]
        )
        == 1
    )
    assert "cert_file and key_file" in capsys.readouterr().err


def test_tls_settings_are_checked(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="go together"):
        Settings(tls_cert=str(certs / "server.pem"))
    with pytest.raises(ValidationError, match="needs TLS"):
        Settings(tls_client_ca=str(certs / "ca.pem"))
    with pytest.raises(ValidationError, match="no such file"):
        Settings(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(certs / "server.key"))
