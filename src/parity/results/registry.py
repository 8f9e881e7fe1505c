"""The case registry: the one list of models every suite, session and unit test reads.

A model is one table in ``toy_config/registry.toml`` plus its ``toy_config/<id>_toy/`` folder
(``config.json`` and ``README.md``). Everything that can be read off the config is derived here
and never written twice: MoE or not, text / VLM / Omni (so which suites apply), the vision patch
size. The table holds what cannot be derived: tolerances, ``max_sp_size`` with its reason, and the
modes the model does not support, each with its reason (recorded as such, never dropped)::

    [qwen3_5]
    max_sp_size = 1
    max_sp_reason = "GatedDeltaNet linear-attention layers do not take the sequence split"

    [some_model.unsupported]
    parity_flash_attention_3_with_sp = "head_dim 96 is not built into this FA3"

Torch-free: nox's interpreter and the merge import it. ``PARITY_TOY_CONFIG_ROOT`` points the whole
registry (its ``registry.toml`` and the toy folders) at another tree, which is how the unit tests
add a model nobody shipped.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity import settings
from parity.results.records import read_json_object

REPO_ROOT = Path(__file__).resolve().parents[3]
REGISTRY_FILE = "registry.toml"
SUFFIX = "_toy"

#: The seed's defaults: sized for bf16. fp32 runs tighten them (see parity.results.compare).
PATCH_TOLERANCE = (1e-2, 1e-2)
E2E_TOLERANCE = (1e-1, 1e-1)

#: Which suites apply to which family of model.
SUITES_BY_FAMILY = {
    "text": ("patch", "e2e"),
    "vlm": ("patch", "e2e", "vlm_trainer", "dummy_forward"),
    "omni": ("patch", "e2e", "vlm_trainer", "dummy_forward"),
}
_EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts")
_FIELDS = {
    "config": str,
    "rtol": float,
    "atol": float,
    "e2e_rtol": float,
    "e2e_atol": float,
    "max_sp_size": int,
    "max_sp_reason": str,
    "unsupported": dict,
    "gradient_checkpointing": bool,
    "note": str,
}


class ToyConfigError(ValueError):
    """A toy config id/path/file that cannot be used; the message names the file or id and why."""


class RegistryError(ValueError):
    """The registry file or one of its entries is malformed; the message names file and field."""


# --------------------------------------------------------------------------------------------
# the toy tree


def toy_root() -> Path:
    """Re-read on every call so tests and sessions can point at another tree late."""
    return settings.get(settings.TOY_CONFIG_ROOT) or REPO_ROOT / "toy_config"


def known_models() -> list[str]:
    """Sorted ids of every ``<id>_toy/config.json`` under the toy root."""
    root = toy_root()
    if not root.is_dir():
        return []
    return sorted(p.parent.name[: -len(SUFFIX)] for p in root.glob(f"*{SUFFIX}/config.json") if p.is_file())


def config_path(model_id_or_path: str | os.PathLike[str]) -> Path:
    """Resolve an id (``qwen3``), a toy dir, or a config.json path to the config.json file.

    Ids are what pytest case ids and nox positional args carry; paths are what the seed's
    ``pytest.param("./toy_config/...")`` style carries. Both must work.
    """
    raw = os.fspath(model_id_or_path)
    candidate = Path(raw).expanduser()
    if not candidate.is_absolute() and not candidate.exists() and (REPO_ROOT / candidate).exists():
        candidate = REPO_ROOT / candidate  # seed-style "./toy_config/..." from another working dir
    looks_like_path = candidate.suffix == ".json" or os.sep in raw or bool(os.altsep and os.altsep in raw)
    if candidate.is_dir():
        target = candidate / "config.json"
        if not target.is_file():
            raise ToyConfigError(f"{target}: missing file (directory {candidate} has no config.json)")
        return target
    if candidate.is_file():
        return candidate
    if looks_like_path:
        raise ToyConfigError(f"{candidate}: missing file")
    model_id = raw[: -len(SUFFIX)] if raw.endswith(SUFFIX) else raw
    target = toy_root() / f"{model_id}{SUFFIX}" / "config.json"
    if target.is_file():
        return target
    known = known_models()
    close = difflib.get_close_matches(model_id, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ToyConfigError(
        f"unknown toy model id {model_id!r} (no {target}).{hint} Known ids: {', '.join(known) or '(none)'}"
    )


def read_json(path: Path) -> dict[str, Any]:
    """Parse with positions in the error, because a toy config is edited by hand."""
    return read_json_object(path, ToyConfigError)


def config_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of the canonical JSON, so whitespace/key-order edits do not change the fingerprint."""
    data = read_json(config_path(path))
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# facts derived from the config


def _sub(data: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = data.get(key)
    if isinstance(value, dict):
        return value
    thinker = data.get("thinker_config")
    if isinstance(thinker, dict) and isinstance(thinker.get(key), dict):
        return thinker[key]
    return None


def family_of(data: dict[str, Any]) -> str:
    """ "omni" (audio and vision encoders), "vlm" (vision encoder) or "text"."""
    if _sub(data, "audio_config") is not None:
        return "omni"
    if _sub(data, "vision_config") is not None:
        return "vlm"
    return "text"


def text_config_of(data: dict[str, Any]) -> dict[str, Any]:
    return _sub(data, "text_config") or data


def is_moe_config(data: dict[str, Any]) -> bool:
    """Routed experts in the text stack (the MoE backends apply then)."""
    text = text_config_of(data)
    return any(
        isinstance(text.get(k), int) and not isinstance(text.get(k), bool) and text[k] > 0
        for k in _EXPERT_COUNT_KEYS
    )


def patch_size_of(data: dict[str, Any]) -> int | None:
    vision = _sub(data, "vision_config")
    size = vision.get("patch_size") if vision else None
    return size if isinstance(size, int) else None


# --------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class Case:
    id: str
    config: Path
    model_type: str
    family: str
    is_moe: bool
    patch_size: int | None = None
    rtol: float = PATCH_TOLERANCE[0]
    atol: float = PATCH_TOLERANCE[1]
    e2e_rtol: float = E2E_TOLERANCE[0]
    e2e_atol: float = E2E_TOLERANCE[1]
    max_sp_size: int | None = None
    max_sp_reason: str = ""
    #: attention or experts implementation name -> why this model cannot run it
    unsupported: dict[str, str] = field(default_factory=dict)
    #: also run the dummy_forward job with activation checkpointing
    gradient_checkpointing: bool = False
    note: str = ""

    @property
    def suites(self) -> tuple[str, ...]:
        return SUITES_BY_FAMILY[self.family]

    @property
    def config_arg(self) -> str:
        """The path as the seed's case lists write it: ``./toy_config/<id>_toy/config.json``."""
        try:
            return "./" + self.config.relative_to(REPO_ROOT).as_posix()
        except ValueError:
            return str(self.config)

    def unsupported_reason(
        self, attn_implementation: str, moe_implementation: str | None = None
    ) -> str | None:
        """Why the model cannot run this mode (its registry entry says so), or None."""
        for name in (attn_implementation, moe_implementation):
            if name and name in self.unsupported:
                return f"{self.id} does not support {name}: {self.unsupported[name]}"
        return None


def _registry_path() -> Path:
    return toy_root() / REGISTRY_FILE


def _load_table() -> dict[str, Any]:
    path = _registry_path()
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise RegistryError(f"{path}: missing file (the case registry)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{path}: invalid TOML: {exc}") from exc


def _make_case(case_id: str, entry: Any, where: Path) -> Case:
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}: [{case_id}] must be a table")
    for key, value in entry.items():
        kind = _FIELDS.get(key)
        if kind is None:
            raise RegistryError(f"{where}: [{case_id}] unknown field {key!r}; known: {', '.join(_FIELDS)}")
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise RegistryError(f"{where}: [{case_id}] field {key!r} must be {kind.__name__}, got {value!r}")
    for key in ("rtol", "atol", "e2e_rtol", "e2e_atol", "max_sp_size"):
        if key in entry and not entry[key] > 0:
            raise RegistryError(f"{where}: [{case_id}] field {key!r} must be positive, got {entry[key]!r}")
    unsupported = entry.get("unsupported", {})
    for name, why in unsupported.items():
        if not isinstance(why, str) or not why.strip():
            raise RegistryError(f"{where}: [{case_id}.unsupported] {name!r} needs a reason string")
    if "max_sp_size" in entry and not entry.get("max_sp_reason"):
        raise RegistryError(f"{where}: [{case_id}] max_sp_size needs a max_sp_reason")
    config = (
        config_path(entry["config"]) if "config" in entry else config_path(toy_root() / f"{case_id}{SUFFIX}")
    )
    return case_from_config(
        case_id,
        config,
        **{k: (float(v) if _FIELDS[k] is float else v) for k, v in entry.items() if k != "config"},
    )


def case_from_config(case_id: str, config: Path, **fields: Any) -> Case:
    """A case for any config.json: the facts derived from it plus the given fields (or defaults)."""
    data = read_json(config)
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ToyConfigError(f"{config}: missing 'model_type'")
    return Case(
        id=case_id,
        config=Path(config),
        model_type=model_type,
        family=family_of(data),
        is_moe=is_moe_config(data),
        patch_size=patch_size_of(data),
        **fields,
    )


def cases() -> list[Case]:
    """Every registered case, in the registry file's order, then the ad-hoc ``--config`` cases."""
    where = _registry_path()
    found = [_make_case(case_id, entry, where) for case_id, entry in _load_table().items()]
    return found + extra_cases()


ADHOC_FILE = ".adhoc_cases.json"  # in the results folder; the dot keeps it out of the merge


def adhoc_id(config: Path) -> str:
    """``path/to/llama_2b/config.json`` -> ``llama_2b``: the id is the config's folder name."""
    name = Path(config).parent.name or Path(config).stem
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name


def check_adhoc_config(raw: str) -> Case:
    """A case for ``--config PATH``, or a ToyConfigError naming the file and what is wrong with it.

    Checks what would otherwise fail deep inside a child process: the file exists and is a JSON
    object, transformers knows its ``model_type`` (when transformers is importable here) and the
    text stack has attention heads.
    """
    path = Path(raw).expanduser().resolve()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ToyConfigError(f"{path}: --config: no such file")
    data = read_json(path)
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ToyConfigError(f"{path}: --config: missing 'model_type'")
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # the nox interpreter may have no transformers: the variant env checks again
        CONFIG_MAPPING_NAMES = None
    if CONFIG_MAPPING_NAMES is not None and model_type not in CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ToyConfigError(f"{path}: --config: transformers does not know model_type {model_type!r}.{hint}")
    heads = text_config_of(data).get("num_attention_heads")
    if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0:
        raise ToyConfigError(
            f"{path}: --config: no attention heads (num_attention_heads={heads!r} in the text config)"
        )
    return case_from_config(adhoc_id(path), path)


def write_adhoc(results: Path, configs: dict[str, Path]) -> Path:
    """The ad-hoc cases for the suites' pytest processes (they read it through PARITY_EXTRA_CASES)."""
    path = Path(results) / ADHOC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: str(v) for k, v in configs.items()}, indent=2) + "\n")
    return path


def extra_cases() -> list[Case]:
    """The ``--config`` cases named in ``PARITY_EXTRA_CASES``: default tolerances, facts from the config."""
    path = settings.get(settings.EXTRA_CASES)
    return adhoc_cases(Path(path)) if path else []


def adhoc_cases(path: Path) -> list[Case]:
    """The ad-hoc cases of an ad-hoc file (or of the results folder holding one): the merge reads the
    same file the suites were given, so a ``--config`` run is judged as its own registry entry."""
    path = Path(path)
    if path.is_dir():
        path = path / ADHOC_FILE
        if not path.is_file():
            return []
    entries = read_json(path)
    return [case_from_config(case_id, Path(config)) for case_id, config in entries.items()]


def cases_for(suite: str) -> list[Case]:
    return [c for c in cases() if suite in c.suites]


def case(case_id: str) -> Case:
    found = {c.id: c for c in cases()}
    if case_id in found:
        return found[case_id]
    close = difflib.get_close_matches(case_id, list(found), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise RegistryError(f"unknown model id {case_id!r}.{hint} Known: {', '.join(found)}")


def ids(suite: str | None = None) -> list[str]:
    return [c.id for c in (cases_for(suite) if suite else cases())]


def problems() -> list[str]:
    """Toy folders without a registry entry and entries without a folder: each a sentence to fix."""
    registered = set(_load_table())
    found = []
    for model_id in known_models():
        if model_id not in registered:
            found.append(
                f"{toy_root() / (model_id + SUFFIX)} has no entry in {_registry_path()}: "
                f"add a [{model_id}] table"
            )
    for model_id in sorted(registered):
        try:
            _make_case(model_id, _load_table()[model_id], _registry_path())
        except (RegistryError, ToyConfigError) as exc:
            found.append(str(exc))
    return found


def main(argv: list[str]) -> int:
    """``python -m parity.results.registry CONFIG ...``: check ``--config`` files in a variant env
    (where transformers is importable, so an unknown model_type is caught); exit 2 on the first bad one."""
    for raw in argv:
        try:
            check_adhoc_config(raw)
        except ToyConfigError as exc:
            print(f"error: {exc}", flush=True)
            return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
