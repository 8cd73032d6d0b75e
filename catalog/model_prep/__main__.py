"""``python -m catalog.model_prep``: prepare the default model ahead of time and print its directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from catalog.model_prep import DEFAULT_MODEL_NAME, prepare_default_model
from chatq.errors import ChatqError


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
