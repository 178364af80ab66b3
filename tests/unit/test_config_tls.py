"""`listen`'s mapping form with `tls`: what `ssefan check` accepts and refuses
(files that are missing, don't parse, or don't belong together), with the
file, line and key path, and never a byte of the key; and what a reload of
it needs a restart for. Certificates are made with `openssl` into tmp_path."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from tls_certs import Cert, make_cert

from ssefan.cli import main
from ssefan.config import Config, ListenConfig, TLSConfig
from ssefan.ops.reload import keep_fixed, plan
from ssefan.ops.tls import CertificateSwap

ROUTES = "routes:\n  - path: /events\n    upstream: http://127.0.0.1:8000/events\n"


def write(tmp_path: Path, tls_lines: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("listen:\n  address: 127.0.0.1:8443\n  tls:\n" + tls_lines + ROUTES)
    return path


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["check", "--config", str(path)])
    out = capsys.readouterr()
    return status, out.out + out.err


def key_material(cert: Cert) -> list[str]:
    """The base64 lines of the key file: none may ever be printed."""
    return [line for line in cert.key.read_text().splitlines() if not line.startswith("-----")]


@pytest.fixture
def cert(tmp_path: Path) -> Cert:
    return make_cert(tmp_path / "certs")


def test_check_accepts_a_certificate_and_its_key(
    tmp_path: Path, cert: Cert, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = check(write(tmp_path, f"    cert: {cert.cert}\n    key: {cert.key}\n"), capsys)
    assert status == 0, out
    assert f"listen 127.0.0.1:8443 (TLS 1.2+, cert {cert.cert}, alpn h2, http/1.1)" in out
    assert not any(line in out for line in key_material(cert))


def test_string_form_is_plain_http(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen:\n  address: 127.0.0.1:8080\n" + ROUTES)
    status, out = check(path, capsys)
    assert status == 0, out
    assert out.startswith("ok: 1 route") and "TLS" not in out


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        pytest.param(
            "    cert: {missing}\n    key: {key}\n",
            "c.yaml:4: listen.tls.cert: cannot read the certificate file {missing}:"
            " No such file or directory; check the path and that ssefan's user may read it",
            id="missing-cert",
        ),
        pytest.param(
            "    cert: {cert}\n    key: {missing}\n",
            "c.yaml:5: listen.tls.key: cannot read the key file {missing}:"
            " No such file or directory; check the path and that ssefan's user may read it",
            id="missing-key",
        ),
        pytest.param(
            "    cert: {junk}\n    key: {key}\n",
            "c.yaml:4: listen.tls.cert: {junk} holds no PEM certificate (no certificate or"
            " crl found); expected the certificate chain, leaf first, each starting with"
            " -----BEGIN CERTIFICATE-----",
            id="unparsable-cert",
        ),
        pytest.param(
            "    cert: {key}\n    key: {key}\n",
            "c.yaml:4: listen.tls.cert: {key} holds no PEM certificate (no certificate or"
            " crl found); expected the certificate chain, leaf first, each starting with"
            " -----BEGIN CERTIFICATE-----",
            id="key-as-cert",
        ),
        pytest.param(
            "    cert: {cert}\n    key: {junk}\n",
            "c.yaml:5: listen.tls.key: {junk} is not a PEM private key (it does not parse);"
            " expected a file that starts with -----BEGIN PRIVATE KEY----- (or RSA/EC PRIVATE KEY)",
            id="unparsable-key",
        ),
        pytest.param(
            "    cert: {cert}\n    key: {other_key}\n",
            "c.yaml:5: listen.tls.key: the key does not match listen.tls.cert ({other_key} is"
            " not the private key of the certificate in {cert}); point key at the"
            " certificate's own key",
            id="key-mismatch",
        ),
        pytest.param(
            "    cert: {cert}\n    key: {key}\n    alpn: [h2, h2]\n",
            "c.yaml:6: listen.tls.alpn: a protocol is listed more than once; keep one of each",
            id="alpn-twice",
        ),
        pytest.param(
            "    cert: {cert}\n    key: {key}\n    alpn: [spdy/3]\n",
            'c.yaml:6: listen.tls.alpn[0]: expected h2 or http/1.1, got "spdy/3"',
            id="alpn-unknown",
        ),
        pytest.param(
            "    cert: {cert}\n    key: {key}\n    min_version: 1.1\n",
            'c.yaml:6: listen.tls.min_version: expected "1.2" or "1.3" (the lowest TLS'
            " version served), got 1.1",
            id="min-version-1.1",
        ),
        pytest.param(
            "    cert: {cert}\n",
            "c.yaml:3: listen.tls.key: missing; expected its private key, like"
            ' "/etc/ssefan/tls/privkey.pem"',
            id="key-missing",
        ),
        pytest.param(
            "    cert: {cert}\n    key: {key}\n    ciphers: HIGH\n",
            "c.yaml:6: listen.tls.ciphers: unknown key; expected one of: cert, key,"
            " min_version, alpn",
            id="unknown-key",
        ),
    ],
)
def test_check_refuses(
    tmp_path: Path,
    cert: Cert,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tls: str,
    expected: str,
) -> None:
    other = make_cert(tmp_path / "other", "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a pem file\n")
    names = {
        "cert": cert.cert,
        "key": cert.key,
        "missing": tmp_path / "nope.pem",
        "junk": junk,
        "other_key": other.key,
    }
    write(tmp_path, tls.format(**names))
    monkeypatch.chdir(tmp_path)  # messages name the file as given: c.yaml
    status, out = check(Path("c.yaml"), capsys)
    assert status == 2
    assert expected.format(**names) in out.splitlines(), out
    for secret in key_material(cert) + key_material(other):
        assert secret not in out


def test_unreadable_key_is_named(
    tmp_path: Path, cert: Cert, capsys: pytest.CaptureFixture[str]
) -> None:
    # A directory where the key should be: unreadable as a file even for root
    # (a permission test would pass for nobody running as root, CI included).
    key = tmp_path / "key-dir"
    key.mkdir()
    status, out = check(write(tmp_path, f"    cert: {cert.cert}\n    key: {key}\n"), capsys)
    assert status == 2
    assert f"listen.tls.key: cannot read the key file {key}: Is a directory" in out, out


LISTEN = ListenConfig(host="127.0.0.1", port=8443)
TLS = TLSConfig(cert="/etc/a.crt", key="/etc/a.key")


def config(listen: ListenConfig) -> Config:
    return Config(listen=listen)


@pytest.mark.parametrize(
    ("old", "new", "restart"),
    [
        pytest.param(
            replace(LISTEN, tls=TLS),
            replace(LISTEN, tls=replace(TLS, cert="/etc/b.crt", min_version="1.3")),
            [],
            id="new-certificate-applies",
        ),
        pytest.param(
            LISTEN,
            replace(LISTEN, tls=TLS),
            ["listen.tls changed from plain HTTP to TLS: still serving plain HTTP until a restart"],
            id="tls-on",
        ),
        pytest.param(
            replace(LISTEN, tls=TLS),
            LISTEN,
            ["listen.tls changed from TLS to plain HTTP: still serving TLS until a restart"],
            id="tls-off",
        ),
        pytest.param(
            replace(LISTEN, tls=TLS),
            replace(LISTEN, port=9443, tls=TLS),
            [
                "listen changed from 127.0.0.1:8443 to 127.0.0.1:9443:"
                " still listening on 127.0.0.1:8443 until a restart"
            ],
            id="address",
        ),
    ],
)
def test_reload_plan(old: ListenConfig, new: ListenConfig, restart: list[str]) -> None:
    assert plan(config(old), config(new)).needs_restart == restart
    kept = keep_fixed(config(old), config(new)).listen
    assert (kept.host, kept.port) == (old.host, old.port)
    assert (kept.tls is None) == (old.tls is None)
    if old.tls is not None and new.tls is not None:
        assert kept.tls == new.tls


def test_swap_keeps_the_old_context_when_new_files_fail(
    tmp_path: Path, cert: Cert, caplog: pytest.LogCaptureFixture
) -> None:
    """The files changed between the reload's config check and the swap: the
    fresh context fails, a warning names the file, the old one stays current."""
    tls = TLSConfig(cert=str(cert.cert), key=str(cert.key))
    swap = CertificateSwap(tls)
    assert swap.current is swap.listening
    other = make_cert(tmp_path / "other", "other")
    mismatched = TLSConfig(cert=str(cert.cert), key=str(other.key))
    with caplog.at_level(logging.WARNING, logger="ssefan"):
        assert not swap.reload(mismatched)
    assert swap.current is swap.listening and swap.tls is tls
    assert [r.getMessage() for r in caplog.records] == [
        f"reload: listen.tls.key: the key does not match listen.tls.cert ({other.key} is not"
        f" the private key of the certificate in {cert.cert}); point key at the certificate's"
        " own key; still serving the previous certificate"
    ]
    renewed = make_cert(tmp_path / "renewed", "renewed")
    assert swap.reload(TLSConfig(cert=str(renewed.cert), key=str(renewed.key)))
    assert swap.current is not swap.listening
