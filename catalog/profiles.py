"""Model profiles: what a worker may load, under which names, with which engine settings.

The profiles live in a TOML file (catalog/profiles.toml unless PROFILES_FILE names
another), one `[[profile]]` table each. They are checked once, when a process loads
the file, and a mistake is refused with a message naming the file, the profile and
the field. A request names a model by a profile's id or any of its aliases; the alias
resolves in the API before the job is queued, so a model has one queue whatever name
its clients use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from chatq.config_file import read_toml
from chatq.errors import ConfigError
from chatq.settings import Role, Settings

DEFAULT_PROFILES_FILE = Path(__file__).resolve().parent / "profiles.toml"

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Quantization = Literal["awq", "gptq", "awq_marlin", "gptq_marlin", "fp8", "bitsandbytes"]
Share = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]

# Used when neither the model nor its profile has a chat template, so that every model
# answers chat requests the same way (the ChatML format most instruct models know).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class EngineArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The vLLM engine arguments a profile runs with (vLLM's names, underscores)."""

    dtype: Dtype = "auto"  # "auto" is float32 on vLLM's CPU build (bfloat16 garbles SmolLM2)
    max_model_len: Annotated[int, msgspec.Meta(ge=64)] = 4096
    tensor_parallel_size: Positive = 1
    gpu_memory_utilization: Share = 0.9
    quantization: Quantization | None = None
    swap_space_gib: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    enforce_eager: bool = True
    tool_call_parser: str | None = None


class SamplingDefaults(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Sampling used where a request does not say (vLLM's generation config override)."""

    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: int | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    max_tokens: Positive | None = None

    def as_dict(self) -> dict[str, float | int]:
        """The set fields, as vLLM's --override-generation-config takes them."""
        out: dict[str, float | int] = {}
        for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.max_tokens is not None:
            out["max_new_tokens"] = self.max_tokens
        return out


class MemorySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the hardware check needs to size the model: its parameters and KV-cache shape."""

    params_b: Annotated[float, msgspec.Meta(gt=0.0)]  # billions of parameters
    layers: Positive
    kv_heads: Positive
    head_dim: Positive
    # The checkpoint's real size where the parameter count misleads (quantized models).
    weights_gib: Annotated[float, msgspec.Meta(gt=0.0)] | None = None


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One model a worker can load."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][\w.\-/:]*$")]
    name: Name
    # A Hugging Face id or a local directory; empty means the bundled SmolLM2.
    model: str = ""
    aliases: list[Name] = []
    cpu: bool = False  # whether vLLM's CPU build can run it (no GPU needed)
    engine: EngineArgs = EngineArgs()
    sampling: SamplingDefaults = SamplingDefaults()
    memory: MemorySpec
    # A Jinja chat template (inline, or a path to a file) for models that have none.
    chat_template: str | None = None
    # The operator's system prompt: the first message of every chat request to this model.
    system_prompt: Annotated[str, msgspec.Meta(min_length=1, max_length=20_000)] | None = None
    # Who may not send a system prompt of their own: true (every caller) or a list of roles.
    system_prompt_locked: bool | list[Role] = False

    def locks_system_prompt(self, role: Role) -> bool:
        """Whether a caller of this role may not send a system prompt of their own."""
        locked = self.system_prompt_locked
        return locked if isinstance(locked, bool) else role in locked

    @property
    def names(self) -> list[str]:
        """The id and every alias: the names vLLM serves it under."""
        return [self.id, *self.aliases]


class ProfileSet:
    """The profiles of one file, with lookups by id or alias."""

    def __init__(self, profiles: list[Profile], source: Path | None = None) -> None:
        self.source = source
        self._profiles = {p.id: p for p in profiles}
        self._names: dict[str, Profile] = {}
        for p in profiles:
            for name in p.names:
                self._names[name] = p
                self._names.setdefault(name.casefold(), p)

    @classmethod
    def empty(cls) -> ProfileSet:
        return cls([])

    def __iter__(self) -> Iterator[Profile]:
        return iter(self._profiles.values())

    def __len__(self) -> int:
        return len(self._profiles)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.resolve(name) is not None

    def get(self, profile_id: str) -> Profile | None:
        return self._profiles.get(profile_id)

    def resolve(self, name: str) -> Profile | None:
        """The profile a request's model name means: its id or an alias (any case)."""
        return self._names.get(name) or self._names.get(name.casefold())

    def names(self) -> set[str]:
        """Every id and alias."""
        return {n for p in self for n in p.names}


_LOC = re.compile(r" - at `\$\.?([^`]*)`")


def _field_error(exc: msgspec.ValidationError) -> tuple[str, str]:
    """(field path, the message without msgspec's location suffix)."""
    text = str(exc)
    match = _LOC.search(text)
    if match is None:
        return "", text
    field = re.sub(r"\[(\d+)\]", r"[\1]", match.group(1))
    return field, _LOC.sub("", text)


def parse_profiles(data: Mapping[str, Any], source: str) -> ProfileSet:
    """Check the decoded TOML and build the profiles; ConfigError names file, profile and field."""
    unknown = sorted(set(data) - {"profile"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {', '.join(unknown)}; expected [[profile]] tables"
        )
    raw = data.get("profile", [])
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: no profiles; add [[profile]] tables")
    profiles: list[Profile] = []
    owners: dict[str, str] = {}
    for index, entry in enumerate(raw):
        label = (
            f"profile {entry.get('id')!r}"
            if isinstance(entry, dict) and entry.get("id")
            else f"profile #{index + 1}"
        )
        try:
            profile = msgspec.convert(entry, Profile)
        except msgspec.ValidationError as exc:
            field, message = _field_error(exc)
            where = f", field {field!r}" if field else ""
            raise ConfigError(f"{source}: {label}{where}: {message}") from None
        for name in profile.names:
            other = owners.get(name.casefold())
            if other is not None:
                what = "id" if name == profile.id else "alias"
                raise ConfigError(
                    f"{source}: {label}, field {what!r}: the name {name!r} is already used "
                    f"by profile {other!r}"
                )
            owners[name.casefold()] = profile.id
        if profile.engine.quantization and profile.engine.quantization != "fp8" and profile.cpu:
            raise ConfigError(
                f"{source}: {label}, field 'cpu': {profile.engine.quantization} models need a GPU"
            )
        profiles.append(profile)
    return ProfileSet(profiles, None)


def load_profiles(path: str | Path | None = None) -> ProfileSet:
    """Read and check a profiles file (the bundled one by default); raises ConfigError."""
    file = Path(path) if path else DEFAULT_PROFILES_FILE
    profiles = parse_profiles(read_toml(file, "PROFILES_FILE"), str(file))
    # A chat template given as a relative file path is relative to the profiles file.
    fixed = [
        msgspec.structs.replace(p, chat_template=str(file.parent / p.chat_template))
        if p.chat_template and "{" not in p.chat_template and not Path(p.chat_template).is_absolute()
        else p
        for p in profiles
    ]
    return ProfileSet(fixed, file)


def settle_model_profile(settings: Settings, profiles: ProfileSet | None = None) -> Settings:
    """The settings with MODEL_PROFILE (an id or alias) named by its profile's id everywhere.

    A profile's id is its served name, so an alias names the same queue. Raises ConfigError
    when MODEL_PROFILE names no profile. Without MODEL_PROFILE the settings come back as they are.
    """
    if settings.model_profile is None:
        return settings
    profiles = profiles if profiles is not None else load_profiles(settings.profiles_file)
    profile = profiles.resolve(settings.model_profile)
    if profile is None:
        raise ConfigError(
            f"MODEL_PROFILE {settings.model_profile!r} is not a profile in {profiles.source}; "
            f"profiles: {', '.join(p.id for p in profiles)}"
        )
    models = tuple(profile.id if m == settings.model_profile else m for m in settings.models)
    return msgspec.structs.replace(settings, model_profile=profile.id, model_name=profile.id, models=models)
