"""Certificates made with the openssl CLI for the TLS tests, and a server that serves with them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.helpers.servers import ServerThread, make_settings


def openssl(*args: str, cwd: Path) -> None:
    # Not a skip: .ci/run installs it, and a TLS gap should not pass unseen anywhere.
    assert shutil.which("openssl"), "these tests need the openssl CLI (apt-get install openssl)"
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue(name: str, cwd: Path, extensions: str) -> None:
    """A P-256 key and a certificate for it signed by ca.pem."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    (cwd / f"{name}.ext").write_text(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip


def start(certs: Path, client_ca: bool) -> ServerThread:
    return ServerThread(
        make_settings(
            tls_cert=str(certs / "server.pem"),
            tls_key=str(certs / "server.key"),
            tls_client_ca=str(certs / "ca.pem") if client_ca else None,
            warmup=False,
        )
    )


def make_certs(folder: Path) -> Path:
    """A CA in `folder`, and a server (localhost, 127.0.0.1) and a client certificate it signed."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=segserve-test-ca", cwd=folder)  # fmt: skip
    issue("server", folder, "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    issue("client", folder, "extendedKeyUsage=clientAuth\n")
    return folder
