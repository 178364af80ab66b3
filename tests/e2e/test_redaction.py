"""Credentials in URLs never reach a printed line: `redact` (ssefan.http.redaction) is the one
function every printer uses (log lines, `ssefan check`), tested here as a table
and end to end through a real ssefan's pass-through failures."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from app_server import TestApp
from raw_http import RawConnection
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, VerboseSsefan, stop_clean, write_config
from waits import wait_until

from ssefan.ops.logs import JsonFormatter, KeyValueFormatter, is_secret_param, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "https://app/cb?code=SplxlOBeZQ&state=xyz",
            "https://app/cb?code=***&state=xyz",
            id="oauth-code",
        ),
        pytest.param(
            "GET /e?jwt=eyJhbGciOi.eyJzdWIi.sig -> 504: slow",
            "GET /e?jwt=*** -> 504: slow",
            id="jwt",
        ),
        pytest.param(
            "/cb?id_token=a.b.c&access_token=at1&refresh_token=rt1&scope=read",
            "/cb?id_token=***&access_token=***&refresh_token=***&scope=read",
            id="oauth-tokens",
        ),
        pytest.param(
            "https://app/cb#access_token=2YotnF&token_type=bearer&expires_in=3600",
            "https://app/cb#access_token=***&token_type=bearer&expires_in=3600",
            id="implicit-flow-fragment",
        ),
        pytest.param(
            "https://b.s3.amazonaws.com/o?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIA%2F20240101&X-Amz-Security-Token=FQoG"
            "&X-Amz-Signature=fe5f80f77d5f&X-Amz-Expires=60",
            "https://b.s3.amazonaws.com/o?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=***&X-Amz-Security-Token=***"
            "&X-Amz-Signature=***&X-Amz-Expires=60",
            id="s3-presigned",
        ),
        pytest.param(
            "/o?Expires=1&Signature=abc~d&Key-Pair-Id=K2J&AWSAccessKeyId=AKIA",
            "/o?Expires=1&Signature=***&Key-Pair-Id=***&AWSAccessKeyId=***",
            id="cloudfront-and-s3v2",
        ),
        pytest.param("/f?sig=zz9&sv=2024", "/f?sig=***&sv=2024", id="sig"),
        pytest.param(
            "/a?key=k1&apikey=k2&api_key=k3&apiKey=k4",
            "/a?key=***&apikey=***&api_key=***&apiKey=***",
            id="api-keys",
        ),
        pytest.param(
            "/a?password=hunter2&secret=s1&token=t1&auth=a1&session=s2",
            "/a?password=***&secret=***&token=***&auth=***&session=***",
            id="plain-names",
        ),
        pytest.param(
            "/a?ACCESS_TOKEN=t1&Code=c1&JWT=j1", "/a?ACCESS_TOKEN=***&Code=***&JWT=***", id="case"
        ),
        pytest.param(
            "/a?access%5Ftoken=t1&%63ode=c1&id%255Ftoken=t2",
            "/a?access%5Ftoken=***&%63ode=***&id%255Ftoken=***",
            id="percent-encoded-names",
        ),
        pytest.param(
            "/login?next=https%3A%2F%2Fapp%2Fcb%3Fcode%3Dc0de%26state%3Dok",
            "/login?next=https%3A%2F%2Fapp%2Fcb%3Fcode%3D***%26state%3Dok",
            id="url-inside-a-parameter",
        ),
        pytest.param(
            "/login?next=%252Fcb%253Fjwt%253Dj1%2526page%253D2",
            "/login?next=%252Fcb%253Fjwt%253D***%2526page%253D2",
            id="url-inside-a-parameter-twice-encoded",
        ),
        pytest.param("/a?next=/b?code=c1", "/a?next=/b?code=***", id="question-mark-in-value"),
        pytest.param("/a?x=1;token=t1;y=2", "/a?x=1;token=***;y=2", id="semicolons"),
        pytest.param(
            "(see http://app/e?api_key=K9z).", "(see http://app/e?api_key=***).", id="prose"
        ),
        pytest.param(
            "upstream=http://u:p4ss@app:8000/e failed",
            "upstream=http://***@app:8000/e failed",
            id="userinfo",
        ),
        pytest.param(
            "Authorization: Bearer eyJhbGciOi.x.y", "Authorization: Bearer ***", id="bearer"
        ),
        pytest.param(
            "GET /events?topic=news&last_event_id=42&lastEventId=7&page=2&keyword=k&signal=s",
            "GET /events?topic=news&last_event_id=42&lastEventId=7&page=2&keyword=k&signal=s",
            id="harmless-params-kept",
        ),
        pytest.param(
            "/a?author=me&monkey=1&error_code=E1&zip_code=1",
            "/a?author=me&monkey=1&error_code=E1&zip_code=1",
            id="lookalikes-kept",
        ),
        pytest.param("/a?code=&token", "/a?code=&token", id="nothing-to-hide"),
        pytest.param("route=/e status code=504", "route=/e status code=504", id="not-a-url"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # redacting twice changes nothing more


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        *[
            pytest.param(name, True, id=name)
            for name in (
                "code",
                "jwt",
                "id_token",
                "access_token",
                "refresh_token",
                "signature",
                "sig",
                "X-Amz-Signature",
                "X-Amz-Credential",
                "X-Amz-Security-Token",
                "X-Goog-Signature",
                "key",
                "apikey",
                "api_key",
                "password",
                "passwd",
                "secret",
                "client_secret",
                "token",
                "auth",
                "session",
                "PHPSESSID",
                "code_verifier",
                "oauth_verifier",
                "SAMLResponse",
                "otp_code",
                "ticket",
            )
        ],
        *[
            pytest.param(name, False, id=name)
            for name in (
                "topic",
                "last_event_id",
                "lastEventId",
                "token_type",
                "expires_in",
                "state",
                "keyword",
                "author",
                "signal",
                "design",
                "error_code",
                "X-Amz-Expires",
            )
        ],
    ],
)
def test_is_secret_param(name: str, secret: bool) -> None:
    assert is_secret_param(name) is secret


# --- end to end: pass-through failures log the target -------------------------------

OAUTH_CODE = "oauth-code-5f3a9"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
MAX_BODY = 1024


@pytest.fixture(scope="module")
def proxying(
    app: TestApp, stream_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SsefanProcess]:
    config: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "app": app.url,
        "proxy": {"first_byte_timeout": "200ms", "max_body_bytes": MAX_BODY},
        "routes": [{"path": "/events", "upstream": stream_upstream.url}],
    }
    path = write_config(tmp_path_factory.mktemp("redaction") / "ssefan.yaml", config)
    proc = VerboseSsefan(path).start()
    try:
        yield proc
    finally:
        stop_clean(proc)


def _failure_line(proc: SsefanProcess, status: int) -> str:
    def line() -> str | None:
        return next((ln for ln in proc.lines if f"-> {status}:" in ln), None)

    wait_until(lambda: line() is not None, what=f"the -> {status} log line")
    found = line()
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("status", "request_head"),
    [
        pytest.param(
            504,
            f"GET /slow?code={OAUTH_CODE}&jwt={JWT}&topic=news HTTP/1.1\r\n"
            "Host: ssefan.test\r\nConnection: close\r\n\r\n",
            id="504-app-too-slow",
        ),
        pytest.param(
            413,
            f"POST /echo?code={OAUTH_CODE}&jwt={JWT}&topic=news HTTP/1.1\r\n"
            f"Host: ssefan.test\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n",
            id="413-body-over-the-limit",
        ),
    ],
)
def test_pass_through_failure_lines_hide_credential_params(
    proxying: SsefanProcess, status: int, request_head: str
) -> None:
    conn = RawConnection(proxying.host, proxying.port)
    try:
        conn.send(request_head.encode("ascii"))
        assert conn.read_response().status == status
    finally:
        conn.close()
    line = _failure_line(proxying, status)
    assert "code=***&jwt=***&topic=news" in line, line
    for secret in (OAUTH_CODE, JWT):
        assert secret not in proxying.log_text()


def test_both_log_formats_redact() -> None:
    record = logging.LogRecord(
        "ssefan.proxy", logging.WARNING, __file__, 1, "request=1 GET %s -> 504", (), None
    )
    record.args = (f"/slow?code={OAUTH_CODE}#id_token={JWT}",)
    for formatter in (KeyValueFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert OAUTH_CODE not in line and JWT not in line
    item = json.loads(JsonFormatter().format(record))
    assert item["msg"] == "request=1 GET /slow?code=***#id_token=*** -> 504"
