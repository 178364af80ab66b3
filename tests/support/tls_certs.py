"""Certificates for the TLS tests, made with the `openssl` CLI into a test's tmp_path.

Each is a self-signed P-256 certificate for 127.0.0.1 and localhost, so a
client can trust exactly it (`verify=cert`); its serial number is random, so
two made in one test are told apart by it.
"""

from __future__ import annotations

import hashlib
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Cert:
    cert: Path
    key: Path

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER certificate, as a peer sees it."""
        der = ssl.PEM_cert_to_DER_cert(self.cert.read_text())
        return hashlib.sha256(der).hexdigest()

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this certificate only."""
        return ssl.create_default_context(cafile=str(self.cert))


def make_cert(directory: Path, name: str = "server", cn: str = "localhost") -> Cert:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN={cn}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=OPENSSL_TIMEOUT,
    )
    return Cert(cert=cert, key=key)


def peer_fingerprint(der: bytes | None) -> str:
    assert der is not None, "the server sent no certificate"
    return hashlib.sha256(der).hexdigest()
