"""Smoke test of the load-test tool: a tiny steps run against chatq's synthetic engine.

Runs `python -m loadtest` as a subprocess (it starts nats-server, a synthetic worker and
the API itself) and checks the JSON report and the chart; no timing assertions. Also the
kpi scenario's verdicts, a run without matplotlib, and Ctrl-C in the middle of a step.
"""

from __future__ import annotations

import json
import os
import re
import signal
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


@pytest.mark.timeout(150)
def test_a_scaled_target_runs_its_workers_and_apis_and_is_compared_with_one_of_each(tmp_path: Path) -> None:
    """synthetic-2w-2api: two workers share the queue behind two API processes on one port;
    the report adds up both workers' counters and prints the scaling table."""
    cmd = [
        sys.executable, "-m", "loadtest",
        "--targets", "synthetic,synthetic-2w-2api", "--scenario", "steps", "--concurrency", "4",
        "--step-seconds", "3", "--max-tokens", "8", "--synth-slots", "1",
        "--num-prompts", "50", "--warmup", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(next(tmp_path.iterdir()).joinpath("report.json").read_text())
    logs = report["targets"]["synthetic-2w-2api"]["logs"]
    assert {"worker-1", "worker-2", "api-1", "api-2"} <= logs.keys()
    scaled = next(s["summary"] for s in report["steps"] if s["target"] == "synthetic-2w-2api")
    assert scaled["ok"] == scaled["requests"] > 0
    # Every token the clients got was counted by one of the two workers' metrics.
    assert scaled["probes"]["worker_tokens"] == scaled["output_tokens"]
    assert "scaling: N workers, M API processes" in proc.stdout
    assert re.search(r"synthetic-2w-2api\s+2\s+2\s+c=4", proc.stdout), proc.stdout[-2000:]


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


def only_run(out: Path) -> Path:
    runs = list(out.iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.timeout(120)
def test_kpi_against_synthetic_judges_every_kpi(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "loadtest",
        "--targets", "synthetic", "--scenario", "kpi", "--step-seconds", "2", "--max-tokens", "8",
        "--num-prompts", "50", "--warmup", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((only_run(tmp_path) / "report.json").read_text())
    assert report["scenario"] == "kpi"
    assert [s["label"] for s in report["steps"]] == ["ctx=2048", "c=5"]
    section = report["kpi"]
    assert section["context_tokens"] == 2048
    assert section["sessions"] == 5
    assert [d["id"] for d in section["definitions"]] == ["ttft_p50_s", "req_per_min", "http_5xx_pct"]
    verdicts = section["targets"]["synthetic"]["kpis"]
    assert set(verdicts) == {"ttft_p50_s", "req_per_min", "http_5xx_pct"}
    for kpi in verdicts.values():
        assert isinstance(kpi["value"], (int, float))
        assert isinstance(kpi["pass"], bool)
    # The synthetic engine answers in 50 ms: far inside every target.
    assert section["targets"]["synthetic"]["all_pass"] is True
    assert "== kpi: the plan's targets" in proc.stdout


@pytest.mark.timeout(120)
def test_without_matplotlib_the_report_is_kept_and_the_chart_skipped(tmp_path: Path) -> None:
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("matplotlib is blocked by this test")\n')
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(shim.parent), os.environ.get("PYTHONPATH")])),
    }
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "loadtest",
        "--targets", "synthetic", "--scenario", "steps", "--concurrency", "1",
        "--step-seconds", "2", "--max-tokens", "8", "--num-prompts", "50", "--warmup", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = only_run(out)
    report = json.loads((run / "report.json").read_text())
    assert report["steps"][0]["summary"]["ok"] > 0
    assert "chart" not in report["files"]
    assert not (run / "chart.png").exists()
    assert "chart: not drawn, matplotlib is not installed; `scripts/bootstrap.sh loadtest`" in proc.stdout


@pytest.mark.timeout(120)
def test_ctrl_c_mid_step_keeps_the_finished_requests_and_exits_130(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "loadtest",
        "--targets", "synthetic", "--scenario", "steps", "--concurrency", "1,2",
        "--step-seconds", "60", "--max-tokens", "8", "--num-prompts", "50", "--warmup", "1",
        "--progress-seconds", "1", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    with (tmp_path / "stdout.txt").open("w+") as stdout:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        # The first step is under way once its progress line counts a finished request.
        for line in proc.stderr:
            match = re.match(r"progress: synthetic c=1 \d+/60 s, (\d+) requests", line)
            if match and int(match.group(1)) > 0:
                break
        else:
            pytest.fail(f"no progress line; exit {proc.wait()}")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        stdout.seek(0)
        printed = stdout.read()
    assert proc.returncode == 130, printed[-3000:] + err[-3000:]
    run = only_run(tmp_path / "out")
    report = json.loads((run / "report.json").read_text())
    assert report["interrupted"] is True
    assert report["failures"] == {"synthetic": "interrupted"}
    (step,) = report["steps"]  # the second step never started
    assert step["label"] == "c=1"
    assert step["interrupted"] is True
    assert step["summary"]["ok"] > 0
    samples = (run / "requests.jsonl").read_text().splitlines()
    assert len(samples) == step["summary"]["requests"]
    assert "interrupted; writing the report of what was measured" in printed
