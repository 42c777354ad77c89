"""`burnguard report`: the HTML page renders in headless Chromium and its charts draw.

The page is built from the dashboard scenario (tests/support/dashboard_scenario.py) on the
real chDB engine, then loaded by Debian's `chromium`; the page's own script marks
each chart with the number of marks that have a size after layout (`data-drawn`),
which `--dump-dom` shows. A screenshot is taken as well and checked for colour.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from burnguard.sinks import operational as op
from burnguard.sinks.clickhouse import ClickHouseWriter, connect
from burnguard.sinks.report import render
from burnguard.sinks.schema import migrate
from typer.testing import CliRunner

from burnguard.cli.history import db_app, report
from tests.support import dashboard_scenario as sc

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
]
FILTERS = op.Filters(sc.START, sc.END, interval_s=sc.INTERVAL_S)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is needed for the report test: apt-get install -y chromium"
    return path


@pytest.fixture(scope="module")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    dsn = f"chdb://{tmp_path_factory.mktemp('report') / 'clickhouse'}"
    client = connect(dsn)
    try:
        migrate(client)
        writer = ClickHouseWriter(client)
        writer.insert_spans(sc.scenario_spans())
        writer.insert_signals(sc.scenario_signals())
    finally:
        client.close()
    return dsn


@pytest.fixture(scope="module")
def page(dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    client = connect(dsn)
    try:
        html = render(client, FILTERS)
    finally:
        client.close()
    path = tmp_path_factory.mktemp("page") / "report.html"
    path.write_text(html, encoding="utf-8")
    yield path


def _run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )


def test_report_is_self_contained(page: Path) -> None:
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), (
        "the report must not fetch anything"
    )
    assert "<link" not in html and "@import" not in html
    assert html.count("<svg") >= 10
    # the numbers of the scenario are on the page
    assert "1.85" in html  # spend
    assert "0.25" in html  # cost per successful workflow
    assert "2,470" in html  # tokens per action


def test_report_charts_draw_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    dom = _run_chromium(["--dump-dom", page.as_uri()], tmp_path / "profile").stdout
    charts = int(re.search(r'data-charts="(\d+)"', dom).group(1))
    drawn = int(re.search(r'data-charts-drawn="(\d+)"', dom).group(1))
    assert charts >= 10 and drawn == charts, (charts, drawn)
    marks = {
        label: int(count)
        for count, label in re.findall(r'data-drawn="(\d+)"[^>]*?aria-label="([^"]+)"', dom)
        + [(c, label) for label, c in re.findall(r'aria-label="([^"]+)"[^>]*?data-drawn="(\d+)"', dom)]
    }
    assert marks["Spend by tenant (exact)"] == 2
    assert marks["Spend by model class"] == 3
    assert marks["Spend over time by tenant"] == 2  # one line per tenant
    assert marks["Input tokens by call number in a session (average)"] == 4


def _png_colours(path: Path) -> int:
    """Distinct colours of an 8-bit RGB(A) PNG (Chromium's screenshots), decoded with zlib."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour_type = header[:4]
    assert depth == 8 and colour_type in (2, 6)
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    previous = bytearray(stride)
    colours = set()
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = previous[i]
            c = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        if row % 4 == 0:
            colours.update(bytes(line[i : i + 3]) for i in range(0, stride, bpp * 4))
        previous = line
    return len(colours)


def test_report_screenshot_has_the_chart_colours(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    _run_chromium([f"--screenshot={shot}", "--window-size=1400,1800", page.as_uri()], tmp_path / "profile")
    assert shot.stat().st_size > 10_000
    assert _png_colours(shot) > 20  # white page + text alone has few colours; the charts add the palette


def test_report_command_writes_the_page(dsn: str, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("report")(report)
    app.add_typer(db_app, name="db")
    out = tmp_path / "r.html"
    runner = CliRunner()
    result = runner.invoke(app, ["db", "migrate", "--dsn", dsn])
    assert result.exit_code == 0, result.output
    args = ["report", "--dsn", dsn, "--out", str(out), "--since", "3h", "--until", sc.END.isoformat()]
    result = runner.invoke(app, [*args, "--tenant", "acme"])
    assert result.exit_code == 0, result.output
    html = out.read_text(encoding="utf-8")
    assert "tenant: acme" in html and "0.85" in html and "globex" not in html.split("Spend against")[0]
