"""The TLS context the listener serves, built from `listen.tls` and checked.

`ssefan check` and start-up build it to validate the files (there, a problem
is a config problem with file, line and key path); a reload builds a fresh
one and swaps it in only if it works (ops.tls), because a failed
`load_cert_chain()` on the live context breaks every new handshake.

A problem names the file and what is wrong with it, never its contents: a
key file's bytes are the secret.
"""

from __future__ import annotations

import ssl

from ssefan.config.schema import TLSConfig

__all__ = ["TLSProblem", "server_context"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSProblem(ValueError):
    """The files of `listen.tls` can't be served. `field` is "cert" or "key":
    the setting to fix (`listen.tls.<field>`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class _Encrypted(Exception):
    """The key asked for a passphrase (raised from the password callback, so
    OpenSSL never prompts on a terminal)."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """A new server context for `tls`'s files; TLSProblem if they can't serve."""
    for field, path in (("cert", tls.cert), ("key", tls.key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            what = "certificate" if field == "cert" else "key"
            raise TLSProblem(
                field,
                f"cannot read the {what} file {path}: {err.strerror or err};"
                " check the path and that ssefan's user may read it",
            ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    # CRIME (compression) and client-initiated renegotiation are off; RFC 9113
    # §9.2.1 forbids both for HTTP/2, and HTTP/1.1 needs neither.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(list(tls.alpn))
    _check_certificate(tls.cert)
    try:
        context.load_cert_chain(tls.cert, tls.key, password=_no_passphrase)
    except _Encrypted:
        raise TLSProblem(
            "key",
            f"the key file {tls.key} is encrypted with a passphrase; ssefan reads it unattended:"
            " decrypt it (openssl pkey -in KEY -out KEY.plain) and keep it readable only by ssefan",
        ) from None
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise TLSProblem(
                "key",
                f"the key does not match listen.tls.cert ({tls.key} is not the private key of"
                f" the certificate in {tls.cert}); point key at the certificate's own key",
            ) from None
        raise TLSProblem(
            "key",
            f"{tls.key} is not a PEM private key ({_reason(err)}); expected a file that starts"
            " with -----BEGIN PRIVATE KEY----- (or RSA/EC PRIVATE KEY)",
        ) from None
    return context


def _check_certificate(path: str) -> None:
    """That `path` holds at least one PEM certificate, told apart from a bad key
    (load_cert_chain reports both as "PEM lib")."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=path)
    except ssl.SSLError as err:
        raise TLSProblem(
            "cert",
            f"{path} holds no PEM certificate ({_reason(err)}); expected the certificate chain,"
            " leaf first, each starting with -----BEGIN CERTIFICATE-----",
        ) from None


def _reason(err: ssl.SSLError) -> str:
    # OpenSSL's reason code ("NO_START_LINE"), not the message, which can
    # quote a file's bytes.
    if not err.reason or err.reason == "PEM_LIB":
        return "it does not parse"
    return str(err.reason).lower().replace("_", " ")
