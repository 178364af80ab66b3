"""Log lines: key=value or JSON, one line per record, never a credential."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

import pytest
from opsharness import NotifyReceiver, short_socket_path
from sse_upstream import FakeUpstream
from ssefan_process import CommandProcess, SsefanProcess, route_config, serve_args, write_config
from waits import wait_until

from ssefan.config import parse_config
from ssefan.ops.logs import JsonFormatter, KeyValueFormatter, Redactor, config_secrets
from ssefan.ops.supervisor import Supervisor


def record(
    msg: str, *args: object, level: int = logging.INFO, **extra: object
) -> logging.LogRecord:
    rec = logging.LogRecord("ssefan.test", level, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


@pytest.mark.parametrize(
    ("msg", "expected_msg"),
    [
        pytest.param("plain", "msg=plain", id="bare"),
        pytest.param("two words", 'msg="two words"', id="spaces-quoted"),
        pytest.param('say "hi"', r'msg="say \"hi\""', id="quotes-escaped"),
        pytest.param("line\nbreak", r'msg="line\nbreak"', id="one-line"),
        pytest.param("", 'msg=""', id="empty"),
    ],
)
def test_key_value_line(msg: str, expected_msg: str) -> None:
    line = KeyValueFormatter().format(record(msg))
    assert "\n" not in line
    ts, level, logger, rest = line.split(" ", 3)
    assert ts.startswith("ts=") and ts.endswith("Z")
    assert (level, logger, rest) == ("level=info", "logger=ssefan.test", expected_msg)


def test_json_line_with_fields_and_exception() -> None:
    formatter = JsonFormatter(fields={"worker": "1"})
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("route=%s failed", "/events", level=logging.ERROR, peer="127.0.0.1:5")
        rec.exc_info = sys.exc_info()
    line = formatter.format(rec)
    assert "\n" not in line
    item = json.loads(line)
    assert item["level"] == "error" and item["worker"] == "1" and item["peer"] == "127.0.0.1:5"
    assert item["msg"] == "route=/events failed"
    assert "ValueError: boom" in item["exc"]


def test_journald_gets_a_priority_and_no_timestamp() -> None:
    line = KeyValueFormatter(journald=True).format(record("careful", level=logging.WARNING))
    assert line == "<4>level=warning logger=ssefan.test msg=careful"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "upstream=http://u:p4ss@app:8000/e failed",
            "upstream=http://***@app:8000/e failed",
            id="userinfo",
        ),
        pytest.param(
            "url=http://app/e?x=1&access_token=abc123&y=2 (routes)",
            "url=http://app/e?x=1&access_token=***&y=2 (routes)",
            id="token-param",
        ),
        pytest.param("http://app/e?api_key=K9z)", "http://app/e?api_key=***)", id="api-key"),
        pytest.param(
            "Authorization: Bearer eyJhbGciOi.x.y", "Authorization: Bearer ***", id="bearer"
        ),
        pytest.param("retry in 1.5s (attempt 2)", "retry in 1.5s (attempt 2)", id="harmless"),
    ],
)
def test_redactor_patterns(text: str, expected: str) -> None:
    assert Redactor()(text) == expected


def test_redactor_knows_the_configs_secrets() -> None:
    config = parse_config(
        "listen: 127.0.0.1:0\nroutes:\n  - path: /e\n    upstream:\n"
        "      url: http://127.0.0.1:1/e\n"
        "      headers: {Authorization: 'Token s3cr3t-value', X-Api-Key: k-123456, X-Trace: 'on'}\n"
    )
    redact = Redactor()
    redact.add(config_secrets(config))
    assert redact("got s3cr3t-value and k-123456; trace on") == "got *** and ***; trace on"


def test_no_credential_in_any_line(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.status = 401  # failing connects: the upstream URL gets logged
    config = route_config(upstream)
    config["routes"][0]["upstream"] = {  # type: ignore[index]
        "url": upstream.url + "?token=tok-in-url-42",
        "headers": {"Authorization": "Bearer hdr-secret-77", "X-Api-Key": "key-secret-99"},
        "backoff_base": "50ms",
        "backoff_max": "100ms",
    }
    path = write_config(tmp_path / "s.yaml", config)
    proc = CommandProcess(path, serve_args(path, "--log-format", "json")).start()
    try:
        wait_until(lambda: proc.log_text().count("failed: status 401") >= 2, what="failures")
    finally:
        proc.stop()
    assert upstream.requests[0].headers["authorization"] == "Bearer hdr-secret-77"
    text = proc.log_text()
    for secret in ("tok-in-url-42", "hdr-secret-77", "key-secret-99"):
        assert secret not in text
    items = [json.loads(line) for line in proc.lines]  # every line is one JSON object
    assert any("token=***" in item["msg"] for item in items)


def test_journald_stream_is_detected(upstream: FakeUpstream, tmp_path: Path) -> None:
    path = write_config(tmp_path / "s.yaml", route_config(upstream))
    log_path = tmp_path / "journal"
    with log_path.open("w") as journal:
        st = os.fstat(journal.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = CommandProcess(path, serve_args(path), env=env, stderr_to=journal.fileno())
        proc.start()
        try:
            wait_until(lambda: "listening on" in log_path.read_text(), what="the first line")
        finally:
            proc.stop()
    first = log_path.read_text().splitlines()[0]
    assert first.startswith("<6>level=info logger=ssefan msg=") and "ts=" not in first


# --- "reporting ready anyway" is news for systemd only ----------------------------------

UNDER_SYSTEMD = [
    pytest.param(True, id="under-systemd"),
    pytest.param(False, id="no-notify-socket"),
]
READY_ANYWAY = ": reporting ready anyway so the service starts"


def _notify_env(
    systemd: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> NotifyReceiver | None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    if not systemd:
        return None
    receiver = NotifyReceiver.bind(short_socket_path(tmp_path, "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    return receiver


@pytest.mark.parametrize("systemd", UNDER_SYSTEMD)
def test_ready_anyway_is_said_only_under_systemd(
    upstream: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, systemd: bool
) -> None:
    upstream.status = 503  # never ready: the ready timeout runs out
    config = route_config(upstream)
    config["ready_timeout"] = "300ms"
    receiver = _notify_env(systemd, tmp_path, monkeypatch)
    path = write_config(tmp_path / "s.yaml", config)
    proc = SsefanProcess(path, args=("--log-level", "debug")).start()
    try:
        wait_until(
            lambda: "not ready after 0.3s (/events upstream" in proc.log_text(),
            what="the ready timeout's line",
        )
        if receiver is not None:
            receiver.wait_for(lambda m: m.get("READY") == "1", "READY=1 anyway")
        [line] = [ln for ln in proc.lines if "not ready after" in ln]
    finally:
        proc.stop()
        if receiver is not None:
            receiver.close()
    if systemd:
        assert "level=warning" in line and READY_ANYWAY in line, line
    else:
        assert "level=debug" in line, line
        assert "ready anyway" not in proc.log_text()


@pytest.mark.parametrize("systemd", UNDER_SYSTEMD)
def test_supervisor_says_ready_anyway_only_under_systemd(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    systemd: bool,
) -> None:
    receiver = _notify_env(systemd, tmp_path, monkeypatch)
    text = (
        "listen: 127.0.0.1:0\nworkers: 2\nready_timeout: 100ms\n"
        "routes:\n  - path: /e\n    upstream: http://127.0.0.1:1/e\n"
    )
    sup = Supervisor(parse_config(text, str(tmp_path / "s.yaml")), text, [])
    try:
        with caplog.at_level(logging.DEBUG, logger="ssefan"):
            asyncio.run(sup._announce_ready())  # no worker ever starts
        if receiver is not None:
            receiver.wait_for(lambda m: m.get("READY") == "1", "READY=1 anyway")
    finally:
        sup._close()
        if receiver is not None:
            receiver.close()
    [record] = [r for r in caplog.records if r.getMessage().startswith("not ready")]
    why = "not ready after 0.1s (worker 0 not running; worker 1 not running)"
    if systemd:
        assert (record.levelno, record.getMessage()) == (logging.WARNING, why + READY_ANYWAY)
    else:
        assert (record.levelno, record.getMessage()) == (logging.DEBUG, why)
