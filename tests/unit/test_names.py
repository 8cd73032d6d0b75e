"""Subject names: what broker/names.py builds, it can read back."""

from __future__ import annotations

import pytest

from broker import names


@pytest.mark.parametrize("model", ["SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "a.b c"])
@pytest.mark.parametrize("priority", names.PRIORITIES)
def test_a_job_subject_reads_back_as_its_queue(model: str, priority: str) -> None:
    subject = names.job_subject(model, priority)  # type: ignore[arg-type]
    assert names.job_queue_of(subject) == (names.model_key(model), priority)


@pytest.mark.parametrize(
    "subject",
    ["chat.jobs.m", "chat.jobs.m.urgent", "chat.events.completed", "chat.jobs.m.interactive.x", ""],
)
def test_other_subjects_are_no_queue(subject: str) -> None:
    assert names.job_queue_of(subject) is None
