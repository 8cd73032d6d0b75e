"""Dequantize the GGUF with transformers and save a float32 safetensors Llama directory."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from catalog.model_prep.progress import step
from catalog.model_prep.recipe import END_OF_TEXT, END_OF_TURN, ModelPrepError


def convert(gguf_path: Path, out_dir: Path, steps: tqdm[Any]) -> None:
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
        step(steps, "load (dequantize GGUF)")
        # local_files_only: this must never reach out to the hub, whatever HF_* says.
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_file, local_files_only=True)
        quantized = AutoModelForCausalLM.from_pretrained(
            source_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
        )
        steps.update()

        step(steps, "convert to float32")
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

        step(steps, "save safetensors")
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
