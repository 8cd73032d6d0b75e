"""loadtest/gpu-check.sh where there is no GPU, and the Python half it calls.

The script's real run needs an NVIDIA GPU; here it is tested up to where it refuses
(before anything is installed), and its helper (`python -m loadtest.gpu_check`) on its
own: profiles, the budget's split into steps, the NVML verdict, the summary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from catalog.profiles import load_profiles
from loadtest import gpu_check

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "loadtest" / "gpu-check.sh"
# What the script runs before its GPU check; nothing else is on the PATH the tests give it.
TOOLS = ("bash", "dirname", "grep", "head", "timeout")


def bin_dir(tmp_path: Path, nvidia_smi: str | None = None) -> Path:
    """A PATH folder with the script's first tools and, if given, a fake nvidia-smi."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (folder / tool).symlink_to(found)
    if nvidia_smi is not None:
        fake = folder / "nvidia-smi"
        fake.write_text(
            f'#!{shutil.which("bash")}\necho "$@" >> "{tmp_path}/nvidia-smi.calls"\n{nvidia_smi}\n'
        )
        fake.chmod(0o755)
    return folder


def run_script(tmp_path: Path, *args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        "HOME": str(tmp_path),
        # Where the install would go, and chatq's state: neither may appear on a refusal.
        "CHATQ_VENV": str(tmp_path / "venv"),
        "CHATQ_HOME": str(tmp_path / "home"),
    }
    if path is not None:
        env["PATH"] = str(path)
    else:
        env["PATH"] = os.environ["PATH"]
    return subprocess.run(
        [str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )


def test_help_prints_the_usage_and_exits_0(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: loadtest/gpu-check.sh")
    for option in ("--model-dir DIR", "--profile NAME", "--out DIR", "--budget-seconds N"):
        assert option in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--frobnicate"], "unknown argument: --frobnicate"),
        (["--out"], "--out needs a value"),
        (["--budget-seconds", "ten"], "--budget-seconds must be a whole number"),
        (["--budget-seconds", "0"], "--budget-seconds must be a whole number"),
        (["--model-dir", "/nonexistent/model"], "is not a directory"),
    ],
)
def test_bad_arguments_print_the_usage_on_stderr_and_exit_2(
    tmp_path: Path, args: list[str], says: str
) -> None:
    proc = run_script(tmp_path, *args)
    assert proc.returncode == 2
    assert says in proc.stderr
    assert "Usage: loadtest/gpu-check.sh" in proc.stderr
    assert proc.stdout == ""


def assert_refused_before_installing(
    tmp_path: Path, proc: subprocess.CompletedProcess[str], says: str
) -> None:
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu-check: refused: ")
    assert says in lines[0]
    assert "nothing was installed" in lines[0]
    assert proc.stdout == ""
    # bootstrap.sh would have made the venv; the run, its report folder and chatq's state.
    assert not (tmp_path / "venv").exists()
    assert not (tmp_path / "home").exists()
    assert not (tmp_path / "out").exists()


def test_without_nvidia_smi_it_refuses_at_once_and_installs_nothing(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = run_script(tmp_path, "--out", str(tmp_path / "out"), path=bin_dir(tmp_path))
    assert_refused_before_installing(tmp_path, proc, "nvidia-smi is not on PATH")
    assert time.monotonic() - started < 10


def test_a_failing_nvidia_smi_is_refused_with_its_message(tmp_path: Path) -> None:
    failing = 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9'
    path = bin_dir(tmp_path, failing)
    proc = run_script(tmp_path, "--out", str(tmp_path / "out"), path=path)
    assert_refused_before_installing(tmp_path, proc, "nvidia-smi -L failed (NVIDIA-SMI has failed")
    assert (tmp_path / "nvidia-smi.calls").read_text().split() == ["-L"]


def test_an_nvidia_smi_that_lists_no_gpu_is_refused(tmp_path: Path) -> None:
    path = bin_dir(tmp_path, 'echo "No devices found."')
    proc = run_script(tmp_path, "--out", str(tmp_path / "out"), path=path)
    assert_refused_before_installing(tmp_path, proc, "nvidia-smi -L lists no GPU")


# -- the helper ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def bundled_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper reads PROFILES_FILE as chatq does; these tests mean the bundled file."""
    monkeypatch.delenv("PROFILES_FILE", raising=False)


def test_the_bundled_profile_needs_no_model_directory() -> None:
    chosen = gpu_check.choose_profile("smollm2", None, None)
    assert chosen.profile.id == "SmolLM2-135M-Instruct"
    assert chosen.profiles_file is None
    assert "PROFILE_ID=SmolLM2-135M-Instruct\n" in chosen.shell()
    assert "PROFILE_FILE=''\n" in chosen.shell()


def test_a_profile_with_a_model_directory_gets_a_profiles_file_pointing_at_it(tmp_path: Path) -> None:
    model = tmp_path / "Qwen2.5-0.5B-Instruct"
    model.mkdir()
    (model / "config.json").write_text("{}")
    chosen = gpu_check.choose_profile("qwen-0.5b", model, tmp_path / "out" / "profiles.toml")
    (profile,) = list(load_profiles(chosen.profiles_file))
    bundled = load_profiles().get("Qwen2.5-0.5B-Instruct")
    assert profile.model == str(model)
    assert profile.id == "Qwen2.5-0.5B-Instruct"
    assert bundled is not None
    assert (profile.engine, profile.sampling, profile.memory, profile.aliases) == (
        bundled.engine,
        bundled.sampling,
        bundled.memory,
        bundled.aliases,
    )


@pytest.mark.parametrize(
    ("name", "model_dir", "says"),
    [
        ("no-such-model", None, "no profile 'no-such-model'; profiles: SmolLM2-135M-Instruct"),
        ("r1-14b", None, "needs 2 GPUs"),
        ("Qwen2.5-1.5B-Instruct", None, "give its directory with --model-dir"),
        ("Qwen2.5-1.5B-Instruct", "empty", "is not a model directory (no config.json)"),
    ],
)
def test_profiles_that_cannot_run_here_are_refused(
    tmp_path: Path, name: str, model_dir: str | None, says: str
) -> None:
    folder = None
    if model_dir is not None:
        folder = tmp_path / model_dir
        folder.mkdir()
    with pytest.raises(gpu_check.CheckError) as caught:
        gpu_check.choose_profile(name, folder, tmp_path / "profiles.toml")
    assert says in str(caught.value)


@pytest.mark.parametrize("remaining", [20, 60, 100, 250, 300, 350, 400, 480, 600, 3600])
def test_the_planned_steps_fit_in_what_is_left(remaining: int) -> None:
    p = gpu_check.plan(remaining)
    needed = 0
    if p.kpi_step_s:
        needed += gpu_check.WRAP_UP_S + gpu_check.LOADTEST_SETUP_S + gpu_check.KPI_STEPS * p.kpi_step_s
    if p.comparison_step_s:
        needed += (
            gpu_check.LOADTEST_SETUP_S
            + 2 * gpu_check.ENGINE_START_S
            + gpu_check.COMPARISON_STEPS * p.comparison_step_s
        )
    assert needed <= remaining
    for step in (p.kpi_step_s, p.comparison_step_s):
        assert step == 0 or gpu_check.MIN_STEP_S <= step <= gpu_check.MAX_STEP_S
    assert p.comparison_step_s == 0 or p.kpi_step_s > 0  # the KPIs first


def test_the_full_budget_measures_everything_at_the_longest_steps() -> None:
    assert gpu_check.plan(600) == gpu_check.Plan(gpu_check.MAX_STEP_S, gpu_check.MAX_STEP_S)


def gpu_status(**gpu: Any) -> dict[str, Any]:
    """An /api/admin/status answer with one GPU (fields overridable) and a ready worker."""
    figures = {
        "index": 0,
        "name": "NVIDIA L4",
        "utilization_ratio": 0.0,
        "memory_used_bytes": 9 * 2**30,
        "memory_total_bytes": 24 * 2**30,
        "temperature_celsius": 41.0,
        "power_watts": 27.5,
        **gpu,
    }
    return {
        "status": "healthy",
        "reasons": [],
        "services": {"telemetry": {"status": "ok"}},
        "workers": [{"id": "w1", "model": "SmolLM2-135M-Instruct", "engine": "vllm", "state": "ready"}],
        "gpus": [figures],
        "notes": [],
    }


def test_a_gpu_with_nvml_figures_passes() -> None:
    verdict = gpu_check.nvml_verdict(gpu_status())
    assert verdict["pass"], verdict["problems"]
    assert verdict["gpus"][0]["name"] == "NVIDIA L4"


def test_no_gpu_in_the_snapshot_fails_with_the_telemetry_note() -> None:
    status = {**gpu_status(), "gpus": [], "notes": ["no NVIDIA GPU stats: NVML Shared Library Not Found"]}
    verdict = gpu_check.nvml_verdict(status)
    assert not verdict["pass"]
    assert verdict["problems"] == ["no GPU in the telemetry snapshot"]
    assert verdict["notes"] == status["notes"]


@pytest.mark.parametrize(
    ("status", "problem"),
    [
        (gpu_status(memory_used_bytes=0), "GPU 0: no memory in use (is the model on it?)"),
        (gpu_status(memory_total_bytes=0), "GPU 0: no total memory"),
        (gpu_status(utilization_ratio=75), "GPU 0: utilization 75 is not a ratio"),
        ({**gpu_status(), "services": {"telemetry": {"status": "missing"}}}, "telemetry is missing"),
        ({**gpu_status(), "workers": []}, "no ready inference worker"),
    ],
)
def test_missing_or_implausible_figures_fail(status: dict[str, Any], problem: str) -> None:
    verdict = gpu_check.nvml_verdict(status)
    assert not verdict["pass"]
    assert problem in verdict["problems"]


def test_no_answer_from_the_api_fails_with_the_reason() -> None:
    verdict = gpu_check.nvml_verdict(None, "/api/admin/status answered 401: invalid API key")
    assert verdict == {
        "pass": False,
        "problems": ["/api/admin/status answered 401: invalid API key"],
        "gpus": [],
        "notes": [],
    }


def write_report(folder: Path, body: dict[str, Any]) -> None:
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(body))


def test_the_summary_gathers_the_nvml_check_the_kpis_and_the_ratios(tmp_path: Path) -> None:
    (tmp_path / "phases.txt").write_text(
        "install 0 140\nstart 0 75\nnvml 0 6\nkpi 0 95\nstop 0 4\nsteps 0 230\n"
    )
    (tmp_path / "nvml.json").write_text(json.dumps(gpu_check.nvml_verdict(gpu_status())))
    kpi = {
        "context_tokens": 2048,
        "sessions": 5,
        "definitions": [],
        "targets": {
            "chatq": {
                "kpis": {
                    "ttft_p50_s": {"value": 0.08, "pass": True},
                    "req_per_min": {"value": 410.0, "pass": True},
                    "http_5xx_pct": {"value": 0.0, "pass": True},
                },
                "all_pass": True,
                "interrupted": False,
            }
        },
    }
    write_report(tmp_path / "kpi" / "20270101-000000", {"kpi": kpi})
    ratios = {"c=1": {"ttft_p50": 1.02, "itl_p50": 0.99, "tpot_p50": 1.0, "output_tok_per_s": 0.98}}
    write_report(tmp_path / "steps" / "20270101-000400", {"ratios": {"by_step": ratios}, "failures": {}})

    summary = gpu_check.summarize(tmp_path, budget_s=600, wall_s=560)
    assert summary["pass"]
    assert summary["within_budget"]
    assert summary["nvml"]["pass"]
    assert summary["kpi"]["targets"]["chatq"]["all_pass"]
    assert summary["comparison"]["ratios"] == ratios
    text = gpu_check.summary_markdown(summary)
    assert "Result: **PASS** in 560 s (budget 600 s)." in text
    assert "GPU 0 NVIDIA L4: 9.0 GiB of 24.0 GiB" in text
    assert "TTFT p50, 2048-token context" in text and "0.08 s  PASS" in text
    assert "| c=1 | 1.02 | 0.99 | 1.00 | 0.98 |" in text


def test_a_failed_phase_fails_the_summary(tmp_path: Path) -> None:
    (tmp_path / "phases.txt").write_text("install 0 140\nstart 1 900\n")
    summary = gpu_check.summarize(tmp_path, budget_s=600, wall_s=1040)
    assert not summary["pass"]
    assert summary["failed_phases"] == ["start"]
    assert not summary["within_budget"]
    text = gpu_check.summary_markdown(summary)
    assert "Result: **FAIL**" in text
    assert "Not checked (the run stopped before)." in text
