"""Smoke test of the load-test tool: a tiny steps run against chatq's synthetic engine.

Runs `python -m loadtest` as a subprocess (it starts nats-server, a synthetic worker and
the API itself) and checks the JSON report and the chart; no timing assertions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_steps_against_synthetic(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "loadtest",
        "--targets", "synthetic", "--scenario", "steps", "--concurrency", "1,2",
        "--step-seconds", "2", "--max-tokens", "8",
        "--num-prompts", "50", "--warmup", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    runs = list(tmp_path.iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    report = json.loads((run / "report.json").read_text())
    assert report["scenario"] == "steps"
    assert {"config", "machine", "targets", "steps", "ratios", "files"} <= report.keys()
    assert report["failures"] == {}
    assert report["config"]["prompts"]["tokens"] == 256
    assert report["machine"]["cores"] >= 1
    assert report["targets"]["synthetic"]["settings"]["effective"]["engine"] == "synthetic"

    steps = report["steps"]
    assert [(s["target"], s["label"]) for s in steps] == [("synthetic", "c=1"), ("synthetic", "c=2")]
    for step in steps:
        s = step["summary"]
        assert s["requests"] > 0
        assert s["ok"] == s["requests"]
        assert s["errors_total"] == 0
        assert s["output_tokens"] > 0
        assert s["output_tok_per_s"] > 0
        assert s["req_per_min"] > 0
        for metric in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
            assert s[metric]["n"] > 0
            assert s[metric]["p50"] <= s[metric]["p99"]
        assert s["output_tokens_per_request"]["max"] <= 8
        assert s["probes"]["messages_per_token"] > 0
        assert s["synthetic"]["added_first_chunk_ms"]["n"] == s["ok"]

    samples = (run / "requests.jsonl").read_text().splitlines()
    assert len(samples) == sum(s["summary"]["requests"] for s in steps)
    assert (run / "chart.png").stat().st_size > 1000
    assert str(run / "report.json") in proc.stdout
    assert "latency and throughput" in proc.stdout


@pytest.mark.timeout(120)
def test_streams_with_the_lean_client(tmp_path: Path) -> None:
    """The streams scenario's raw asyncio client sees every stream's chunks."""
    cmd = [
        sys.executable, "-m", "loadtest",
        "--targets", "synthetic", "--scenario", "streams", "--streams", "20",
        "--synth-tokens-per-s", "20", "--ramp-seconds", "1", "--step-seconds", "2",
        "--num-prompts", "50", "--warmup", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = list(tmp_path.iterdir())
    report = json.loads((run / "report.json").read_text())
    (step,) = report["steps"]
    s = step["summary"]
    assert s["requests"] == 20
    assert s["ok"] == 20
    assert s["errors_total"] == 0
    samples = [json.loads(line) for line in (run / "requests.jsonl").read_text().splitlines()]
    for sample in samples:
        # 20 tokens/s for over 4 s: each stream saw dozens of one-token chunks, in time order.
        assert len(sample["chunk_times"]) > 40
        assert sample["chunk_times"] == sorted(sample["chunk_times"])
        assert set(sample["chunk_tokens"]) == {1}
