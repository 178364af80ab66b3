"""The unit files: systemd-analyze verifies them and rates the sandbox.

Runs where systemd-analyze is installed (Debian's `systemd` package); no
running systemd is needed: both checks read the files on disk.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parents[2] / "systemd"
# `systemd-analyze security` scores exposure from 0 (locked down) to 10;
# --threshold counts in tenths. The unit scores 1.1 ("OK"); fail past 1.5.
MAX_EXPOSURE_TENTHS = 15

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze not installed")


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this environment's ssefan script
    (verify checks that the command exists)."""
    script = Path(sys.executable).parent / "ssefan"
    assert script.exists(), "install ssefan into this environment (pip install -e .)"
    for name in ("ssefan.service", "ssefan.socket"):
        text = (UNITS / name).read_text().replace("/usr/local/bin/ssefan", str(script))
        (tmp_path / name).write_text(text)
    return tmp_path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert analyze is not None
    return subprocess.run(
        [analyze, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@needs_analyze
def test_units_verify(units: Path) -> None:
    result = run("verify", "./ssefan.service", "./ssefan.socket", cwd=units)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@needs_analyze
def test_sandbox_exposure(units: Path) -> None:
    result = run(
        "security",
        "--offline=true",
        f"--threshold={MAX_EXPOSURE_TENTHS}",
        "./ssefan.service",
        cwd=units,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Overall exposure level for ssefan.service:" in result.stdout


def test_service_essentials() -> None:
    settings = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in (UNITS / "ssefan.service").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert settings["Type"] == "notify"
    assert settings["ExecStartPre"].endswith("ssefan check --config /etc/ssefan/ssefan.yaml")
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["Restart"] == "on-failure"
    assert int(settings["LimitNOFILE"]) >= 100_000
    assert settings["KillMode"] == "mixed"
    assert settings["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert settings["CapabilityBoundingSet"] == ""
