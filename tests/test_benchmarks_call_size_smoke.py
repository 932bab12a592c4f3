"""benchmarks/call_size.py at tiny sizes: it runs every case in a child process, checks each result against one
call, and writes its report and record. No timing is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_writes_the_report_with_the_default_row(tmp_path):
    out = tmp_path / "cs"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.call_size", "--quick", "--out-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "call_size.json").read_text())
    rows = data["results"]
    assert {r["size"] for r in rows} == {1024, 4096, None}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["max_scaled_diff_vs_one_call"] <= 1e-6  # splitting changes nothing beyond float32 rounding
        assert r["peak_rss_bytes"] > 0 and r["points_per_s"] > 0
        assert r["call_points"] == min(r["size"] or r["call_points"], data["points"])
    text = (out / "CALL_SIZE.md").read_text()
    assert "None (default)" in text and "## Summary" in text
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no leftover partial file
