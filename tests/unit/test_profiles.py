"""Model profiles: the bundled file, validation messages, alias resolution, the hardware check."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog.hardware import GIB, GpuInfo, check, memory_need
from catalog.profiles import DEFAULT_PROFILES_FILE, Profile, load_profiles, settle_model_profile
from chatq.errors import ConfigError

MINIMAL = """
[[profile]]
id = "tiny"
name = "Tiny"
aliases = ["t"]
cpu = true
memory = { params_b = 0.1, layers = 2, kv_heads = 1, head_dim = 64 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    return path


def test_the_bundled_file_has_the_promised_profiles() -> None:
    profiles = load_profiles()
    ids = {p.id for p in profiles}
    assert len(profiles) >= 10
    assert {
        "SmolLM2-135M-Instruct",
        "DeepSeek-R1-Distill-Qwen-14B",
        "Qwen2.5-0.5B-Instruct",
        "Qwen2.5-1.5B-Instruct",
        "Qwen2.5-7B-Instruct",
        "Llama-3.1-8B-Instruct",
    } <= ids
    smol = profiles.get("SmolLM2-135M-Instruct")
    assert smol is not None and smol.cpu and smol.model == ""
    r1 = profiles.get("DeepSeek-R1-Distill-Qwen-14B")
    assert r1 is not None and r1.engine.tensor_parallel_size == 2 and r1.engine.dtype == "float16"
    assert any(p.engine.quantization in ("awq", "awq_marlin", "gptq", "gptq_marlin") for p in profiles)


def test_an_alias_resolves_to_its_profile_in_any_case() -> None:
    profiles = load_profiles()
    assert profiles.resolve("smollm2") is profiles.get("SmolLM2-135M-Instruct")
    assert profiles.resolve("QWEN2.5-7B") is profiles.get("Qwen2.5-7B-Instruct")
    assert profiles.resolve("Llama-3.1-8B-Instruct") is profiles.get("Llama-3.1-8B-Instruct")
    assert profiles.resolve("gpt-4") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MINIMAL.replace("cpu = true", 'cpu = "yes"'),
            "profile 'tiny', field 'cpu': Expected `bool`, got `str`",
        ),
        (
            MINIMAL.replace("params_b = 0.1", "params_b = -1"),
            "profile 'tiny', field 'memory.params_b': Expected `float` > 0.0",
        ),
        (MINIMAL.replace('name = "Tiny"\n', ""), "profile 'tiny': Object missing required field `name`"),
        (
            MINIMAL + '\nengine = { dtype = "float8" }\n',
            "profile 'tiny', field 'engine.dtype': Invalid enum value 'float8'",
        ),
        (
            MINIMAL + MINIMAL.replace('id = "tiny"', 'id = "other"'),
            "profile 'other', field 'alias': the name 't' is already used by profile 'tiny'",
        ),
        (
            MINIMAL.replace('aliases = ["t"]', 'aliases = ["t"]\ncolour = "red"'),
            "profile 'tiny': Object contains unknown field `colour`",
        ),
        ("title = 'x'\n", "unknown top-level key(s) title"),
        ("[[profile]]\nid = 3\n", "profile 3, field 'id': Expected `str`, got `int`"),
    ],
)
def test_a_bad_profile_is_refused_naming_file_profile_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_profiles(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_a_missing_or_broken_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"PROFILES_FILE .*nope\.toml: cannot be read"):
        load_profiles(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_profiles(write(tmp_path, "[[profile]\n"))


def test_profiles_file_and_model_profile_settings() -> None:
    from chatq.settings import load

    env = {"MODEL_PROFILE": "qwen2.5-7b", "PROFILES_FILE": str(DEFAULT_PROFILES_FILE)}
    s = settle_model_profile(load(env))
    assert s.model_name == s.models[0] == "Qwen2.5-7B-Instruct"
    assert s.model_profile == "Qwen2.5-7B-Instruct" and s.profiles_file == DEFAULT_PROFILES_FILE
    assert s.unserved_model == "wait" and s.switch_grace_s == 30.0 and not s.require_gpu
    with pytest.raises(ConfigError, match="UNSERVED_MODEL"):
        load({"UNSERVED_MODEL": "sometimes"})


# --- the hardware check, with NVML readings made up -----------------------------------


def gpu(index: int, total_gib: float, free_gib: float | None = None) -> GpuInfo:
    free = total_gib if free_gib is None else free_gib
    return GpuInfo(index, "NVIDIA GeForce RTX 4090", int(total_gib * GIB), int(free * GIB))


def profile(pid: str) -> Profile:
    found = load_profiles().resolve(pid)
    assert found is not None
    return found


def test_fp16_14b_on_two_24_gib_cards_fits() -> None:
    r1 = profile("DeepSeek-R1-Distill-Qwen-14B")
    assert check(r1, [gpu(0, 24), gpu(1, 24)]) is None
    need = memory_need(r1, on_gpu=True)
    assert 27 * GIB < need.weights_bytes < 28.5 * GIB  # 14.8 B parameters at 2 bytes


def test_fp16_14b_on_one_card_is_refused_in_a_sentence() -> None:
    sentence = check(profile("DeepSeek-R1-Distill-Qwen-14B"), [gpu(0, 24)])
    assert sentence == (
        "DeepSeek-R1-Distill-Qwen-14B needs 2 GPUs with 16.3 GiB free each; "
        "this worker has 1 with 24 GiB free"
    )


def test_a_card_taken_by_another_process_is_not_counted() -> None:
    sentence = check(profile("DeepSeek-R1-Distill-Qwen-14B"), [gpu(0, 24), gpu(1, 24, free_gib=6)])
    assert sentence == (
        "DeepSeek-R1-Distill-Qwen-14B needs 2 GPUs with 16.3 GiB free each; "
        "this worker has 1 of its 2 with that much free"
    )


def test_the_awq_14b_fits_one_24_gib_card_and_not_a_12_gib_one() -> None:
    awq = profile("Qwen2.5-14B-Instruct-AWQ")
    assert check(awq, [gpu(0, 24)]) is None
    assert check(awq, [gpu(0, 12)]) == (
        "Qwen2.5-14B-Instruct-AWQ needs 1 GPU with 13.3 GiB free each; this worker has 1 with 12 GiB free"
    )


def test_vllm_share_must_be_free_and_large_enough() -> None:
    qwen7 = profile("Qwen2.5-7B-Instruct")  # gpu_memory_utilization 0.9
    assert check(qwen7, [gpu(0, 24, free_gib=20)]) == (
        "Qwen2.5-7B-Instruct runs vLLM with gpu_memory_utilization 0.9, 21.6 GiB of GPU 0, "
        "but only 20 GiB is free there"
    )
    smol = profile("Qwen2.5-0.5B-Instruct")  # 0.5 of an 8 GiB card is 4 GiB
    assert check(smol, [gpu(0, 8)]) is None
    assert check(qwen7, [gpu(0, 17)]) == (
        "Qwen2.5-7B-Instruct needs 16.1 GiB on each GPU but gpu_memory_utilization 0.9 gives vLLM only "
        "15.3 GiB of GPU 0 (17 GiB)"
    )


def test_without_a_gpu_only_cpu_profiles_load() -> None:
    assert check(profile("SmolLM2-135M-Instruct"), [], host_available=20 * GIB) is None
    assert check(profile("Llama-3.1-8B-Instruct"), []) == (
        "Llama-3.1-8B-Instruct needs 1 GPU with 17 GiB free each; this worker has no GPU "
        "(without one only profiles marked cpu = true load)"
    )
    assert check(profile("Qwen2.5-1.5B-Instruct"), [], host_available=2 * GIB) == (
        "Qwen2.5-1.5B-Instruct needs 6.7 GiB of memory; this host has 2 GiB available"
    )


def test_a_loaded_worker_is_judged_on_total_memory() -> None:
    # The current model holds most of the card; it is unloaded before the new one loads.
    assert check(profile("Qwen2.5-7B-Instruct"), [gpu(0, 24, free_gib=2)], loaded=True) is None


# --- what a worker does with a profile --------------------------------------------------


def test_a_profile_becomes_vllms_arguments(tmp_path: Path) -> None:
    from chatq.settings import load
    from workers.inference.vllm_engine import engine_cli_args

    settings = load({"VLLM_EXTRA_ARGS": "--max-num-batched-tokens 2048"})
    args = engine_cli_args(
        settings, "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", on_cpu=False, profile=profile("r1-14b")
    )
    joined = " ".join(args)
    assert "--served-model-name DeepSeek-R1-Distill-Qwen-14B deepseek-r1-14b r1-14b --dtype float16" in joined
    assert "--tensor-parallel-size 2" in joined and "--gpu-memory-utilization 0.92" in joined
    assert "--max-model-len 16384" in joined and "--enforce-eager" in joined
    assert args[args.index("--override-generation-config") + 1] == (
        '{"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 8192}'
    )
    assert "--swap-space" not in args  # vLLM 0.32 has none; passed only where it exists
    assert "--chat-template" not in args  # a hub id: its own template, as far as chatq can tell
    assert args[-2:] == ["--max-num-batched-tokens", "2048"]
    awq = engine_cli_args(settings, "x", on_cpu=False, profile=profile("qwen-14b-awq"), swap_space=True)
    assert "--quantization awq_marlin" in " ".join(awq) and "--swap-space 4" in " ".join(awq)
    # A local model directory without a chat template gets ChatML; the bundled one keeps its own.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer_config.json").write_text("{}")
    smol_args = engine_cli_args(settings, bare, on_cpu=True, profile=profile("smollm2"))
    assert "<|im_start|>" in smol_args[smol_args.index("--chat-template") + 1]
    assert smol_args[smol_args.index("--dtype") + 1] == "float32"  # auto on CPU


def test_require_gpu_refuses_a_host_without_one() -> None:
    from chatq.settings import load
    from workers.inference.app import fit_check

    with pytest.raises(ConfigError, match="REQUIRE_GPU=true but NVML finds no GPU"):
        fit_check(load({"REQUIRE_GPU": "true"}))
    gpus, fits = fit_check(load({"INFERENCE_ENGINE": "vllm"}))
    assert gpus == 0
    sentence = fits(profile("Llama-3.1-8B-Instruct"), False)
    assert sentence is not None and "this worker has no GPU" in sentence
