"""The Python half of loadtest/gpu-check.sh: the parts of the timed GPU check worth testing.

    python -m loadtest.gpu_check profile --profile NAME [--model-dir DIR] [--write FILE]
    python -m loadtest.gpu_check plan --remaining SECONDS
    python -m loadtest.gpu_check nvml --out DIR [--wait SECONDS]
    python -m loadtest.gpu_check summary --out DIR --budget SECONDS --wall SECONDS

`profile` checks that the profile exists and fits one card, and, given a model directory,
writes a profiles file holding that profile with its `model` pointed at the directory (the
bundled profiles name Hugging Face ids, which a machine with nothing prepared may not
reach). `plan` splits what is left of the budget into step lengths. `nvml` polls
/api/admin/status with the service key until a GPU with NVML figures is reported.
`summary` reads what the run left in the report folder and writes summary.json and
summary.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from catalog.profiles import Profile, load_profiles
from chatq.errors import ConfigError

# What the budget keeps back, in seconds. A guess, not a measurement (no GPU here), to
# revisit after the first run on one: a vLLM start of a small model with enforce_eager.
ENGINE_START_S = 90
# One loadtest run before its first step: imports, the tokenizer, 1000 prompts of each
# length (25 s on the busy 2-core build machine), warm-up requests; after: the report, the chart.
LOADTEST_SETUP_S = 40
# Stopping the stack, copying logs, writing the summary.
WRAP_UP_S = 30
# Steps measured after the NVML check: kpi's two, then the comparison's two sessions
# (1 and 5) on each of chatq and vllm-server.
KPI_STEPS = 2
COMPARISON_STEPS = 4
MIN_STEP_S = 10  # a shorter step says little
MAX_STEP_S = 30
NVML_WAIT_S = 60.0
# How workers/telemetry/collector.py's Nvml says NVML did not start (no driver or library).
NVML_ABSENT_NOTE = "no NVIDIA GPU stats:"


class CheckError(Exception):
    """A reason the GPU check cannot go on, said in one line."""


# -- profile -----------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"no TOML for {value!r}")


def profile_toml(profile: Profile) -> str:
    """One [[profile]] table with the profile's fields."""
    fields: dict[str, Any] = msgspec.to_builtins(profile)
    lines = ["[[profile]]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in fields.items() if v is not None]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ChosenProfile:
    profile: Profile
    model_dir: Path | None  # None: the bundled model, prepared by the launcher
    profiles_file: Path | None  # None: the bundled profiles file

    def shell(self) -> str:
        """Assignments for the script to eval."""
        e = self.profile.engine
        values = {
            "PROFILE_ID": self.profile.id,
            "PROFILE_DTYPE": e.dtype,
            "PROFILE_GPU_MEMORY_UTILIZATION": f"{e.gpu_memory_utilization:g}",
            "PROFILE_MODEL_DIR": str(self.model_dir or ""),
            "PROFILE_FILE": str(self.profiles_file or ""),
        }
        return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


def choose_profile(name: str, model_dir: Path | None, write: Path | None) -> ChosenProfile:
    """The profile NAME, checked for one card; with a model directory, a profiles file for it."""
    try:
        profiles = load_profiles(os.environ.get("PROFILES_FILE") or None)  # what chatq will read
    except ConfigError as exc:
        raise CheckError(str(exc)) from None
    profile = profiles.resolve(name)
    if profile is None:
        raise CheckError(f"no profile {name!r}; profiles: {', '.join(p.id for p in profiles)}")
    tp = profile.engine.tensor_parallel_size
    if tp > 1:
        raise CheckError(f"profile {profile.id} needs {tp} GPUs (tensor_parallel_size); pick a one-card one")
    if model_dir is None:
        if profile.model:
            raise CheckError(
                f"profile {profile.id} loads {profile.model!r}; give its directory with --model-dir "
                "(or use the bundled SmolLM2-135M-Instruct)"
            )
        return ChosenProfile(profile, None, None)
    model_dir = model_dir.expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise CheckError(f"--model-dir {model_dir} is not a model directory (no config.json)")
    if write is None:
        raise CheckError("--model-dir needs --write FILE for the profiles file")
    local = msgspec.structs.replace(profile, model=str(model_dir))
    write.parent.mkdir(parents=True, exist_ok=True)
    write.write_text(
        f"# gpu-check: profile {profile.id} with its model in {model_dir}\n\n" + profile_toml(local)
    )
    try:
        load_profiles(write)  # the file the worker will read, checked as it will check it
    except ConfigError as exc:
        raise CheckError(f"the profiles file written for {profile.id} does not load: {exc}") from None
    return ChosenProfile(local, model_dir, write.resolve())


# -- plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    kpi_step_s: int  # 0: not run
    comparison_step_s: int  # 0: not run

    def shell(self) -> str:
        return f"KPI_STEP_S={self.kpi_step_s}\nCOMPARISON_STEP_S={self.comparison_step_s}\n"


def plan(remaining_s: float) -> Plan:
    """Step lengths that fit what is left of the budget after the NVML check.

    The kpi run measures the chatq already running; the comparison starts chatq and
    vLLM's server once each. When both do not fit, the comparison is dropped first: the
    KPIs are what the check is for.
    """
    room = remaining_s - WRAP_UP_S
    both = (room - 2 * LOADTEST_SETUP_S - 2 * ENGINE_START_S) / (KPI_STEPS + COMPARISON_STEPS)
    if both >= MIN_STEP_S:
        step = min(MAX_STEP_S, math.floor(both))
        return Plan(step, step)
    alone = (room - LOADTEST_SETUP_S) / KPI_STEPS
    return Plan(min(MAX_STEP_S, math.floor(alone)) if alone >= MIN_STEP_S else 0, 0)


# -- nvml --------------------------------------------------------------------------------


def nvml_verdict(status: dict[str, Any] | None, problem: str | None = None) -> dict[str, Any]:
    """Whether /api/admin/status reports a GPU with NVML figures, and what it reports."""
    problems: list[str] = []
    if status is None:
        problems.append(problem or "no answer from /api/admin/status")
        return {"pass": False, "problems": problems, "gpus": [], "notes": []}
    gpus = [g for g in status.get("gpus") or [] if isinstance(g, dict)]
    telemetry = (status.get("services") or {}).get("telemetry") or {}
    if telemetry.get("status") != "ok":
        problems.append(f"telemetry is {telemetry.get('status', 'unknown')}")
    if not gpus:
        problems.append("no GPU in the telemetry snapshot")
    for g in gpus:
        where = f"GPU {g.get('index')}"
        if not g.get("memory_total_bytes"):
            problems.append(f"{where}: no total memory")
        if not g.get("memory_used_bytes"):
            problems.append(f"{where}: no memory in use (is the model on it?)")
        ratio = g.get("utilization_ratio")
        if not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            problems.append(f"{where}: utilization {ratio!r} is not a ratio")
    workers = [w for w in status.get("workers") or [] if isinstance(w, dict)]
    if not any(w.get("state") == "ready" for w in workers):
        problems.append("no ready inference worker")
    return {
        "pass": not problems,
        "problems": problems,
        "gpus": gpus,
        "workers": [
            {k: w.get(k) for k in ("id", "model", "engine", "engine_version", "state")} for w in workers
        ],
        "notes": status.get("notes") or [],
        "status": status.get("status"),
        "reasons": status.get("reasons") or [],
    }


def _nvml_absent(status: dict[str, Any] | None) -> bool:
    """The telemetry worker runs but could not start NVML: waiting longer changes nothing."""
    if status is None or status.get("gpus"):
        return False
    telemetry = (status.get("services") or {}).get("telemetry") or {}
    notes = status.get("notes") or []
    return telemetry.get("status") == "ok" and any(str(n).startswith(NVML_ABSENT_NOTE) for n in notes)


def wait_nvml(wait_s: float) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Poll /api/admin/status (with the service key, as ./status does) until the check passes;
    the verdict and the last answer."""
    from chatq.settings import load
    from stack import state, status_table

    s = load()
    key = None if s.dev_mode or not s.api_keys else sorted(s.api_keys)[0]
    deadline = time.monotonic() + wait_s
    polls = 0
    while True:
        answer, problem = status_table.fetch(state.api_url(s), key)
        polls += 1
        verdict = nvml_verdict(answer, problem)
        if verdict["pass"] or time.monotonic() >= deadline or _nvml_absent(answer):
            return {**verdict, "polls": polls}, answer
        time.sleep(2.0)


# -- summary -----------------------------------------------------------------------------


def _newest_report(folder: Path) -> dict[str, Any] | None:
    reports = sorted(folder.glob("*/report.json"))
    if not reports:
        return None
    data: dict[str, Any] = json.loads(reports[-1].read_text())
    data["_path"] = str(reports[-1])
    return data


def _phases(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                out.append({"phase": parts[0], "exit": int(parts[1]), "seconds": int(parts[2])})
    return out


def summarize(out: Path, budget_s: int, wall_s: int) -> dict[str, Any]:
    """summary.json's content, from the files the run left in `out`."""
    nvml_file = out / "nvml.json"
    nvml = json.loads(nvml_file.read_text()) if nvml_file.is_file() else None
    kpi_run = _newest_report(out / "kpi")
    steps_run = _newest_report(out / "steps")
    phases = _phases(out / "phases.txt")
    plan_file = out / "plan.json"
    planned = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    failed = [p["phase"] for p in phases if p["exit"] != 0]
    return {
        "tool": "chatq gpu-check",
        "budget_seconds": budget_s,
        "wall_seconds": wall_s,
        "within_budget": wall_s <= budget_s,
        "phases": phases,
        "failed_phases": failed,
        "plan": planned,
        "nvml": nvml,
        "kpi": None if kpi_run is None else {"report": kpi_run["_path"], **(kpi_run.get("kpi") or {})},
        "comparison": None
        if steps_run is None
        else {
            "report": steps_run["_path"],
            "ratios": steps_run["ratios"]["by_step"],
            "failures": steps_run.get("failures") or {},
            "interrupted": steps_run.get("interrupted", False),
        },
        "pass": bool(nvml and nvml.get("pass")) and not failed and kpi_run is not None,
    }


def _gib(n: Any) -> str:
    return f"{n / 2**30:.1f} GiB" if isinstance(n, (int, float)) else "-"


def _not_measured(planned: dict[str, Any] | None, step_key: str) -> str:
    if planned is not None and not planned.get(step_key):
        left = planned.get("remaining_seconds")
        return f"Not measured: no room in the budget ({left:.0f} s were left after the NVML check)."
    return "Not measured: the run stopped before, or the loadtest failed (gpu-check.log)."


def summary_markdown(summary: dict[str, Any]) -> str:
    from loadtest import kpi as kpi_mod
    from loadtest.report import num

    lines = [
        "# chatq GPU check",
        "",
        f"Result: **{'PASS' if summary['pass'] else 'FAIL'}** in {summary['wall_seconds']} s "
        f"(budget {summary['budget_seconds']} s).",
        "",
        "| phase | exit | seconds |",
        "| --- | --- | --- |",
        *(f"| {p['phase']} | {p['exit']} | {p['seconds']} |" for p in summary["phases"]),
        "",
        "## NVML telemetry in /api/admin/status",
        "",
    ]
    nvml = summary["nvml"]
    if nvml is None:
        lines.append("Not checked (the run stopped before).")
    else:
        lines.append(
            f"{'PASS' if nvml['pass'] else 'FAIL'}"
            + (f": {'; '.join(nvml['problems'])}" if nvml["problems"] else "")
        )
        for g in nvml["gpus"]:
            lines.append(
                f"- GPU {g.get('index')} {g.get('name')}: {_gib(g.get('memory_used_bytes'))} of "
                f"{_gib(g.get('memory_total_bytes'))}, utilization {g.get('utilization_ratio')}, "
                f"{g.get('temperature_celsius')} °C, {g.get('power_watts')} W"
            )
        lines += [f"- note: {n}" for n in nvml.get("notes") or []]
    lines += ["", "## KPIs (`--scenario kpi` against the chatq started above)", ""]
    section = summary["kpi"]
    if section is None or "targets" not in section:
        lines.append(_not_measured(summary["plan"], "kpi_step_s"))
    else:
        lines += ["```", kpi_mod.table(section), "```", f"Report: {section['report']}"]
    lines += ["", "## chatq ÷ vLLM's server (`--scenario steps`)", ""]
    comparison = summary["comparison"]
    if comparison is None:
        lines.append(_not_measured(summary["plan"], "comparison_step_s"))
    else:
        lines += ["| step | TTFT p50 | ITL p50 | TPOT p50 | out tok/s |", "| --- | --- | --- | --- | --- |"]
        for label, r in comparison["ratios"].items():
            cells = [num(r.get(k)) for k in ("ttft_p50", "itl_p50", "tpot_p50", "output_tok_per_s")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += [f"- {t} failed: {why}" for t, why in comparison["failures"].items()]
        lines.append(f"Report: {comparison['report']}")
    return "\n".join(lines) + "\n"


# -- command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.gpu_check", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    prof = sub.add_parser("profile", help="check a profile; print it as shell assignments")
    prof.add_argument("--profile", required=True)
    prof.add_argument("--model-dir", type=Path)
    prof.add_argument("--write", type=Path, help="where to write the profiles file for --model-dir")
    pl = sub.add_parser("plan", help="step lengths for what is left of the budget")
    pl.add_argument("--remaining", type=float, required=True)
    pl.add_argument("--out", type=Path, help="also write plan.json here, for the summary")
    nv = sub.add_parser("nvml", help="poll /api/admin/status for a GPU with NVML figures")
    nv.add_argument("--out", type=Path, required=True, help="writes nvml.json and status.json here")
    nv.add_argument("--wait", type=float, default=NVML_WAIT_S)
    sm = sub.add_parser("summary", help="write summary.json and summary.md into the report folder")
    sm.add_argument("--out", type=Path, required=True)
    sm.add_argument("--budget", type=int, required=True)
    sm.add_argument("--wall", type=int, required=True)
    args = p.parse_args(argv)
    try:
        if args.command == "profile":
            sys.stdout.write(choose_profile(args.profile, args.model_dir, args.write).shell())
            return 0
        if args.command == "plan":
            chosen = plan(args.remaining)
            if args.out is not None:
                body = {"remaining_seconds": args.remaining, **dataclasses.asdict(chosen)}
                (args.out / "plan.json").write_text(json.dumps(body, indent=2) + "\n")
            sys.stdout.write(chosen.shell())
            return 0
        if args.command == "nvml":
            verdict, answer = wait_nvml(args.wait)
            (args.out / "nvml.json").write_text(json.dumps(verdict, indent=2) + "\n")
            (args.out / "status.json").write_text(json.dumps(answer, indent=2) + "\n")
            print(
                f"nvml: {'PASS' if verdict['pass'] else 'FAIL'}: "
                + ("; ".join(verdict["problems"]) or ", ".join(f"{g.get('name')}" for g in verdict["gpus"]))
            )
            return 0 if verdict["pass"] else 1
        summary = summarize(args.out, args.budget, args.wall)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        text = summary_markdown(summary)
        (args.out / "summary.md").write_text(text)
        sys.stdout.write(text)
        return 0 if summary["pass"] else 1
    except CheckError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
