"""The listener's TLS context, and the certificate swap a reload does.

Finding 6 of the design notes: calling `load_cert_chain()` again on the live
context switches new handshakes to the new certificate, but one that fails
(a key that doesn't match, a half-written file) leaves the context broken
and every later handshake fails. So a reload builds a *fresh* context from
the files (config.tls.server_context checks it completely) and only then
makes it current; the listening context's `sni_callback` hands each new
handshake the current one (`ssl_object.context = current`). Connections
already open keep the context they were made with.
"""

from __future__ import annotations

import logging
import ssl

from ssefan.config import TLSConfig, TLSProblem, server_context

__all__ = ["CertificateSwap"]

log = logging.getLogger("ssefan")


class CertificateSwap:
    """The context a listener is created with, serving whatever is current."""

    __slots__ = ("current", "listening", "tls")

    def __init__(self, tls: TLSConfig) -> None:
        self.tls = tls
        # Raises TLSProblem: at start-up the files were checked moments ago
        # by the config's reading, so this is a file changed meanwhile.
        self.listening = server_context(tls)
        self.current = self.listening
        self.listening.sni_callback = self._handshake

    def _handshake(
        self, ssl_object: ssl.SSLObject, name: str | None, context: ssl.SSLContext
    ) -> None:
        # Runs for every ClientHello, with name None when the client sent no
        # SNI. Switching here also switches the ALPN list the handshake uses.
        current = self.current
        if current is not context:
            ssl_object.context = current

    def reload(self, tls: TLSConfig) -> bool:
        """Serve `tls`'s files from the next handshake on; False (and a
        warning) if they don't work, and the previous certificate stays."""
        try:
            fresh = server_context(tls)
        except TLSProblem as problem:
            log.warning(
                "reload: listen.tls.%s: %s; still serving the previous certificate",
                problem.field,
                problem.message,
            )
            return False
        self.current = fresh
        self.tls = tls
        log.info("reload: new TLS handshakes use %s", tls.cert)
        return True
