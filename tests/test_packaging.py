"""The base install is what goes into user apps: no Faust, no ClickHouse."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = """
import sys
import burnguard, burnguard.instrumentation, burnguard.contracts.otlp
assert burnguard.instrumentation.configure is burnguard.configure
heavy = [m for m in sys.modules if m.split('.')[0] in ('faust', 'clickhouse_connect', 'chdb', 'aiokafka')]
assert not heavy, heavy
for missing in ('faust', 'clickhouse_connect', 'chdb'):
    try:
        __import__(missing)
    except ImportError:
        pass
    else:
        raise AssertionError(missing + ' was installed by the base install')
import importlib.util
bare = [name for name in ('stream', 'sinks', 'contracts', 'instrumentation', 'deploy')
        if importlib.util.find_spec(name) is not None]
assert not bare, 'top-level modules outside the burnguard namespace: ' + repr(bare)
print('base install ok')
"""


@pytest.mark.slow
def test_base_install_imports_instrumentation_without_faust_or_clickhouse(
    installed_venv: Callable[..., Path], tmp_path: Path
) -> None:
    python = installed_venv("base-venv") / "python"
    out = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "base install ok" in out.stdout


def test_every_subpackage_lives_under_the_burnguard_namespace() -> None:
    import burnguard.contracts
    import burnguard.deploy.kafka
    import burnguard.instrumentation
    import burnguard.sinks
    import burnguard.stream

    folders = {
        burnguard.contracts: "contracts",
        burnguard.instrumentation: "instrumentation",
        burnguard.stream: "stream",
        burnguard.sinks: "sinks",
        burnguard.deploy.kafka: "deploy/kafka",
    }
    for module, folder in folders.items():
        assert Path(module.__file__).parent == REPO / folder
