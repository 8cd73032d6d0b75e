"""Logging set-up shared by every chatq process: one line per record, to stderr."""

import logging
import os


def setup_logging(service: str) -> None:
    """Configure the root logger once; LOG_LEVEL picks the level."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
