"""What the commands print: quiet Kafka client logs, the demo's tables, one line for a missing extra."""

from __future__ import annotations

import io
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from burnguard.cli.demo import live_display
from tests.fixtures.pipeline import Pipeline

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


def _table(title: str) -> Table:
    table = Table(title=title)
    table.add_column("tenant")
    table.add_row("acme, with a name wider than any title")  # a title wraps at the table's width
    return table


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_a_table_after_the_live_display_starts_on_its_own_line(terminal: bool) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=80)
    with live_display(_table("live"), console) as live:
        live.update(_table("live, updated"))
    console.print(_table("signals received"))
    lines = [ANSI.sub("", line) for line in out.getvalue().replace("\r", "\n").splitlines()]
    (title,) = [line for line in lines if "signals received" in line]
    assert title.strip() == "signals received", lines
    assert any(line.startswith("└") and line.rstrip().endswith("┘") for line in lines), lines


def _wait_for(pipeline: Pipeline, name: str, text: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while text not in pipeline.log(name):
        assert time.monotonic() < deadline, pipeline.log(name)[-3000:]
        time.sleep(0.2)
    return pipeline.log(name)


@pytest.mark.slow
def test_kafka_client_chatter_is_quiet_unless_verbose(pipeline: Pipeline) -> None:
    pipeline.start_worker()
    sink = pipeline.start_sink()
    time.sleep(5)  # kafka-python refreshes metadata about twice a second while it joins the group
    quiet_sink = _wait_for(pipeline, "sink", "burnguard.sinks")
    pipeline.stop(sink)
    worker_log = pipeline.log("worker")
    assert "[^Worker]: Ready" in worker_log
    assert "Updated metadata" not in worker_log
    assert "Updated metadata" not in quiet_sink
    assert not re.search(r" INFO kafka\.", quiet_sink), quiet_sink[-2000:]

    pipeline.env["BURNGUARD_VERBOSE"] = "1"
    before = len(pipeline.log("sink"))
    sink = pipeline.start_sink()
    deadline = time.monotonic() + 30
    while not re.search(r" INFO kafka\.", pipeline.log("sink")[before:]):
        assert time.monotonic() < deadline, "no kafka-python INFO line with BURNGUARD_VERBOSE=1"
        time.sleep(0.2)
    pipeline.stop(sink)


@pytest.mark.slow
def test_commands_that_need_an_extra_say_which_in_one_line(
    installed_venv: Callable[..., Path], tmp_path: Path
) -> None:
    bin_dir = installed_venv("base-venv")
    expected = {
        ("sink",): "pip install 'burnguard[sinks]'",
        ("worker",): "pip install 'burnguard[stream]'",
        ("dev", "up", "--state-dir", str(tmp_path / "dev")): "pip install 'burnguard[stream,sinks]'",
    }
    for args, hint in expected.items():
        done = subprocess.run(
            [str(bin_dir / "burnguard"), *args], capture_output=True, text=True, cwd=tmp_path, timeout=60
        )
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert done.stderr.strip().splitlines() == [done.stderr.strip()], (args, done.stderr)
        assert hint in done.stderr and "Traceback" not in done.stderr + done.stdout, (args, done.stderr)
    assert not (tmp_path / "dev").exists(), "dev up started something before saying what is missing"
