"""The example gallery (docs/examples/): each script runs as documented and writes its files."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
WRITES = {
    "what_if_study.py": ["study.parquet", "pareto.png", "latency_breakdown.png", "memory_breakdown.png",
                         "roofline.png", "heatmap.png", "pareto_front.csv", "summary.md"],
    "hardware_comparison.py": ["hardware_comparison.png", "hardware_comparison.csv"],
    "plan_search.py": ["plan_search.png", "plan_search.json"],
}
"""Each script and the files it writes into --out (add a new example here)."""


@pytest.mark.parametrize("script", sorted(WRITES))
def test_example_runs_and_writes_its_files(script, tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in WRITES[script]:
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 0, name
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_example_is_indexed_and_tested():
    index = (EXAMPLES / "README.md").read_text()
    for script in WRITES:
        assert f"]({script})" in index
