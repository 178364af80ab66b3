"""ssefan: one upstream SSE subscription per route, fanned out to many clients.

The public surface is what this module names; everything else is internal and
may move. The package is layered (docs/architecture.md, kept by
tests/unit/test_layering.py): core <- config <- http <- stream <- edge <- ops, with
cli and demo on top.
"""

from __future__ import annotations

__version__ = "0.1.0"  # first: ops.app reads it while this module is importing

from ssefan.cli import main
from ssefan.config import Config, load_config
from ssefan.core.sse import Event, Parser, encode

__all__ = ["Config", "Event", "Parser", "__version__", "encode", "load_config", "main"]
