"""``nox -s checklist``: the seed's onboarding checklist for one model, one line per item.

    python -m parity.harness.checklist ID [--run]

The seed document ends with a checklist a person adding a model ticks by hand; three of its items
were how onboarding went wrong (a README that said something else than the config, a collection
check run by a pytest without torch that "passed" with nothing collected, a registry entry that
was never added). Each item here is checked against the files and the project's own environment
and printed as ``STATUS item: what was found``, with the fix when it fails.

Static items (seconds): toy config and its rules, README against the config, registry entry,
MoE fields, unsupported modes, e2e / freeze-ViT / dummy_forward entries (derived from the
config, checked to hold), ``max_sp_size``, and the collection of every suite that applies, run by
this interpreter (the env's) and compared with the node ids the sessions run. A collection of 0
tests is a failure. The run items (suites pass) are queued by the nox session with ``--run``;
their verdicts are in the merged table that ends that run.

Exit code: 0 when no item fails, 1 otherwise.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.harness import toy_rules
from parity.results import modes, registry
from parity.results.modes import VLM_PLANTED_LOOKUPS, control_scenarios

ROOT = registry.REPO_ROOT
PATCH = "tests/models/test_models_patch.py"
E2E = "tests/e2e/test_e2e_parallel.py"
VLM_TRAINER = "tests/models/test_vlm_trainer.py"
DUMMY_FORWARD = "tests/distributed/test_dummy_forward.py"
SUITE_FILES = {"patch": PATCH, "e2e": E2E, "vlm_trainer": VLM_TRAINER, "dummy_forward": DUMMY_FORWARD}
E2E_FUNCTIONS = {
    "text": "test_text_parallel_align",
    "vlm": "test_vlm_parallel_align",
    "omni": "test_vlm_parallel_align",
}
#: Every attention / experts implementation name a registry ``unsupported`` table may name.
ATTENTION_NAMES = frozenset(
    {modes.REFERENCE_ATTENTION}
    | {n for names in modes.HF_ATTENTION.values() for n in names}
    | {n for names in modes.PARITY_ATTENTION.values() for n in names}
)
EXPERTS_NAMES = frozenset({*modes.HF_EXPERTS, *modes.PARITY_EXPERTS})
PASS, FAIL, SKIP, NA, QUEUED = "PASS", "FAIL", "SKIP", "n/a", "QUEUED"


@dataclass
class Item:
    """One checklist line: the seed's wording, what was found, and how to fix it."""

    name: str
    seed: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<6} {self.name}: {self.detail}"
        return text + (f" -> fix: {self.fix}" if self.fix and self.status == FAIL else "")


def expected_nodes(case: registry.Case) -> list[str]:
    """The parametrized node ids the sessions run for this case (their controls are not per model)."""
    nodes = [
        f"{PATCH}::test_models_patch_fwd_bwd[{case.id}]",
        f"{E2E}::{E2E_FUNCTIONS[case.family]}[{case.id}]",
    ]
    if "vlm_trainer" in case.suites:
        nodes.append(f"{VLM_TRAINER}::test_freeze_vit[{case.id}]")
        nodes += [f"{VLM_TRAINER}::test_planted_lookup_is_caught[{case.id}-{f}]" for f in VLM_PLANTED_LOOKUPS]
        nodes.append(f"{VLM_TRAINER}::test_freeze_survives_fsdp2[{case.id}]")
    if "dummy_forward" in case.suites:
        nodes += [
            f"{DUMMY_FORWARD}::test_dummy_pass_reaches_what_a_real_batch_reaches[{case.id}]",
            f"{DUMMY_FORWARD}::test_dummy_forward[{case.id}]",
        ]
        if case.gradient_checkpointing:
            nodes.append(f"{DUMMY_FORWARD}::test_dummy_forward_gradient_checkpointing[{case.id}]")
        nodes += [
            f"{DUMMY_FORWARD}::test_negative_control[{case.id}-{s}]" for s in control_scenarios(case.family)
        ]
    return nodes


# --------------------------------------------------------------------------------------------
# README against the config


_PAREN = re.compile(r"\s*\([^()]*\)")
_LEADING_VALUE = re.compile(r"^\s*(\[[^\]]*\]|-?\d[\d.eE+-]*|true|false|null)(?![\w.])")


def readme_rows(readme: str) -> list[tuple[str, str]]:
    """(field cell, toy cell) of every markdown table in the README that has a "toy" column."""
    rows: list[tuple[str, str]] = []
    toy_col: int | None = None
    for raw in readme.splitlines():
        line = raw.strip()
        if not line.startswith("|"):
            toy_col = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if toy_col is None:
            lowered = [c.lower() for c in cells]
            toy_col = lowered.index("toy") if "toy" in lowered and lowered[0] == "field" else -1
            continue
        if toy_col < 0 or set(line) <= set("|-: ") or len(cells) <= toy_col:
            continue
        rows.append((cells[0], cells[toy_col]))
    return rows


def _clean(cell: str) -> str:
    cell = cell.replace("**", "").replace("`", "").strip()
    while _PAREN.search(cell):
        cell = _PAREN.sub("", cell)
    return cell.strip()


def parse_value(cell: str) -> Any:
    """The value a README cell states, or a sentinel when it is prose (prose is not judged)."""
    text = _clean(cell)
    for candidate in (text, (_LEADING_VALUE.match(text) or [None, None])[1]):
        if candidate is None:
            continue
        try:
            return json.loads(candidate)
        except (json.JSONDecodeError, TypeError):
            continue
    return _PROSE


_PROSE = object()
_UNRESOLVED = object()


def resolve(config: Any, path: str) -> Any:
    """A dotted field of a loaded config (sub-configs, dicts, attribute aliases), or _UNRESOLVED."""
    for root in (config, toy_rules.text_config(config)):
        value: Any = root
        try:
            for part in path.split("."):
                value = value[part] if isinstance(value, dict) else getattr(value, part)
        except (AttributeError, KeyError, TypeError):
            continue
        return value
    return _UNRESOLVED


def _same(stated: Any, actual: Any) -> bool:
    if isinstance(stated, list) and isinstance(actual, (list, tuple)):
        return len(stated) == len(actual) and all(_same(a, b) for a, b in zip(stated, actual, strict=True))
    if isinstance(stated, bool) or isinstance(actual, bool):
        return stated is actual or stated == actual
    if isinstance(stated, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(stated, actual, rel_tol=1e-9, abs_tol=0.0)
    return stated == actual


def readme_disagreements(readme: str, config: Any) -> tuple[list[str], set[str]]:
    """(sentences where the README's toy value differs from the config, fields it states)."""
    problems, stated = [], set()
    for field_cell, toy_cell in readme_rows(readme):
        fields = [f.strip() for f in _clean(field_cell).split(" / ")]
        values = [v.strip() for v in toy_cell.split(" / ")] if len(fields) > 1 else [toy_cell]
        if len(values) != len(fields):
            continue
        for path, cell in zip(fields, values, strict=True):
            if not re.fullmatch(r"[\w.]+", path):
                continue
            actual = resolve(config, path)
            value = parse_value(cell)
            if actual is _UNRESOLVED or value is _PROSE:
                continue
            stated.add(path.removeprefix("text_config."))
            if not _same(value, actual):
                problems.append(f"README says {path} = {_clean(cell)}, config.json has {json.dumps(actual)}")
    return problems, stated


# --------------------------------------------------------------------------------------------
# the items


def _toy_items(case_id: str, case: registry.Case | None) -> tuple[list[Item], Any, Path | None]:
    from parity.harness import toy

    seed = "Toy config created under toy_config/<model>_toy/"
    try:
        path = case.config if case is not None else toy.config_path(case_id)
    except registry.ToyConfigError as exc:
        fix = f"nox -s new_model -- <model_type> --id {case_id}"
        return [Item("toy config", seed, FAIL, str(exc), fix)], None, None
    try:
        config = toy.load_config(path)
    except registry.ToyConfigError as exc:
        return (
            [Item("toy config", seed, FAIL, str(exc), "fix the JSON (the message names line and field)")],
            None,
            path,
        )
    broken = toy_rules.violations(config)
    rel = _rel(path)
    if broken:
        fix = f"edit {rel}, or regenerate: nox -s new_model -- {config.model_type} --id {case_id} --force"
        items = [Item("toy config", seed, FAIL, f"{rel}: " + "; ".join(broken), fix)]
    else:
        items = [Item("toy config", seed, PASS, f"{rel}: {type(config).__name__} loads, toy rules hold")]

    readme_path = path.parent / "README.md"
    seed = "README.md under the toy folder: where the config is from, what was changed"
    if not readme_path.is_file():
        fix = f"write {_rel(readme_path)} (nox -s new_model writes one)"
        items.append(Item("toy README", seed, FAIL, f"{_rel(readme_path)} is missing", fix))
        return items, config, path
    readme = readme_path.read_text(encoding="utf-8")
    kind = toy_rules.family(config)
    problems = toy_rules.readme_violations(readme, kind)
    disagreements, stated = readme_disagreements(readme, config)
    text = toy_rules.text_config(config)
    for key in ("num_hidden_layers", "hidden_size"):
        if key not in stated:
            where = "text_config." if text is not config else ""
            problems.append(f"README does not state {where}{key} (config.json: {getattr(text, key)})")
    problems += disagreements
    if problems:
        fix = f"edit {_rel(readme_path)} to match config.json (or regenerate both: nox -s new_model --force)"
        items.append(Item("toy README", seed, FAIL, "; ".join(problems), fix))
    else:
        items.append(
            Item(
                "toy README",
                seed,
                PASS,
                f"origin link, '{toy_rules.README_SECTION}', {len(stated)} fields agree",
            )
        )
    return items, config, path


def _registry_item(case_id: str) -> tuple[Item, registry.Case | None]:
    seed = "Entry added to the test-cases list (the case registry)"
    where = _rel(registry.toy_root() / registry.REGISTRY_FILE)
    try:
        case = registry.case(case_id)
    except (registry.RegistryError, registry.ToyConfigError) as exc:
        if str(exc).startswith("unknown model id"):
            fix = f"add a [{case_id}] table to {where} (nox -s new_model appends one)"
            return Item("registry entry", seed, FAIL, f"no [{case_id}] table in {where}", fix), None
        try:
            broken = [p for p in registry.problems() if "has no entry" not in p] or [str(exc)]
        except registry.RegistryError as again:  # the file itself does not parse
            broken = [str(again)]
        detail = f"{where} does not load, so no suite collects anything: " + "; ".join(broken)
        return Item("registry entry", seed, FAIL, detail, f"fix {where}"), None
    suites = ", ".join(case.suites)
    return Item("registry entry", seed, PASS, f"[{case_id}] in {where}: {case.family}, suites {suites}"), case


def _moe_item(case: registry.Case, config: Any) -> Item:
    seed = "MoE models: MoE fields and MoE modes"
    if not case.is_moe:
        return Item("MoE fields", seed, NA, "dense model (no routed experts in the config)")
    text = toy_rules.text_config(config)
    experts, top_k = toy_rules.expert_count(text), getattr(text, "num_experts_per_tok", None)
    ok = experts is not None and experts >= toy_rules.MIN_EXPERTS and top_k == toy_rules.TOP_K
    detail = (
        f"{experts} experts, top-{top_k}; patch runs experts {'/'.join(modes.HF_EXPERTS)} (hf) and "
        f"{'/'.join(modes.PARITY_EXPERTS)} (parity), e2e runs ep 1 and 2"
    )
    fix = "8 experts or more, num_experts_per_tok 2 (ep 2 needs several experts per rank)"
    return Item("MoE fields", seed, PASS if ok else FAIL, detail, fix)


def _unsupported_item(case: registry.Case) -> Item:
    seed = "Unsupported attention/MoE modes filtered if needed"
    if not case.unsupported:
        return Item("unsupported modes", seed, PASS, "none declared: every mode of every variant runs")
    problems = []
    for name, why in case.unsupported.items():
        if name in EXPERTS_NAMES and name not in ATTENTION_NAMES and not case.is_moe:
            problems.append(f"{name!r} is an experts implementation, but {case.id} is not MoE")
        elif name not in ATTENTION_NAMES | EXPERTS_NAMES:
            close = difflib.get_close_matches(name, sorted(ATTENTION_NAMES | EXPERTS_NAMES), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(sorted(ATTENTION_NAMES | EXPERTS_NAMES))
            problems.append(f"{name!r} is no mode name ({hint}known: {known})")
        elif name in (modes.REFERENCE_ATTENTION, modes.REFERENCE_EXPERTS):
            problems.append(f"{name!r} is the reference: without it nothing can be compared")
        elif not why.strip():
            problems.append(f"{name!r} has no reason")
    if problems:
        return Item("unsupported modes", seed, FAIL, "; ".join(problems), f"edit [{case.id}.unsupported]")
    listed = "; ".join(f"{k} ({v})" for k, v in case.unsupported.items())
    return Item("unsupported modes", seed, PASS, f"recorded as UNSUPPORTED with the reason: {listed}")


def _e2e_item(case: registry.Case) -> Item:
    seed = "Entry added to text_test_cases (or VLM equivalent) in test_e2e_parallel.py"
    lists = "text_test_cases" if case.family == "text" else "vlm_test_cases"
    layouts = "sp 1/2 x ep 1/2" if case.is_moe else "sp 1/2"
    if case.max_sp_size == 1:
        layouts = "sp 1 x ep 1/2" if case.is_moe else "sp 1"
    return Item("e2e entry", seed, PASS, f"in {lists} ({E2E_FUNCTIONS[case.family]}), layouts {layouts}")


def _sp_item(case: registry.Case, config: Any) -> Item:
    seed = "max_sp_size set appropriately (1 if SP is not supported, None otherwise)"
    text = toy_rules.text_config(config)
    needs_one = []
    if "linear_attention" in (getattr(text, "layer_types", None) or []):
        needs_one.append("linear-attention layers do not take the sequence split")
    if getattr(text, "index_topk", None) is not None:  # parity.backend.attention.reads_dense_mask
        needs_one.append("the sparse-attention indexer picks its top-k keys from the local sequence slice")
    kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if text.num_attention_heads % 2 or kv % 2:
        needs_one.append(f"heads {text.num_attention_heads}/{kv} do not split over sp 2")
    if needs_one and case.max_sp_size != 1:
        fix = f'max_sp_size = 1 and max_sp_reason = "{needs_one[0]}" in [{case.id}]'
        return Item(
            "max_sp_size", seed, FAIL, f"{case.max_sp_size or 'None'}, but " + "; ".join(needs_one), fix
        )
    if case.max_sp_size is None:
        return Item("max_sp_size", seed, PASS, "None: e2e runs sp 1 and 2")
    note = "" if needs_one else " (nothing in the config needs it: remove it once SP works, so sp 2 is tried)"
    return Item("max_sp_size", seed, PASS, f"{case.max_sp_size} because {case.max_sp_reason!r}{note}")


def _multimodal_items(case: registry.Case, config: Any) -> list[Item]:
    seed_vit = "VLM models: toy config in the freeze-ViT VLM cases list (test_vlm_trainer.py)"
    seed_df = "VLM / Omni models: entry in _vlm_cases / _omni_cases (test_dummy_forward.py)"
    if case.family == "text":
        return [
            Item("freeze-ViT case", seed_vit, NA, "text model"),
            Item("dummy_forward entry", seed_df, NA, "text model"),
        ]
    from parity.harness import toy
    from parity.training.dummy_forward import MODALITIES
    from parity.training.vlm_trainer import locate_tower

    model = toy.build_model(config, attn_implementation="eager")
    towers = ("vision", "audio") if case.family == "omni" else ("vision",)
    found, missing = [], []
    for kind in towers:
        try:
            location = locate_tower(model, kind)
        except ValueError as exc:
            missing.append(str(exc))
            continue
        found.append(f"{kind} at model.{location.path}")
        for modality in MODALITIES.values():
            if modality.tower == kind and not callable(getattr(location.owner, modality.method, None)):
                if modality.name == "video" and case.family == "omni":
                    continue  # the Omni batches carry no video
                missing.append(
                    f"{type(location.owner).__name__} has no {modality.method}() for {modality.name}"
                )
    fix = "add the model's tower path / encoder method to src/parity/training/vlm_trainer.py (TOWER_PATHS)"
    if missing:
        vit = Item("freeze-ViT case", seed_vit, FAIL, "; ".join(missing), fix)
    else:
        vit = Item("freeze-ViT case", seed_vit, PASS, f"in _FREEZE_VIT_VLM_CASES; tower {', '.join(found)}")
    patch = getattr(config.vision_config, "patch_size", None)
    lists = "_omni_cases" if case.family == "omni" else "_vlm_cases"
    if case.patch_size != patch:
        df = Item(
            "dummy_forward entry",
            seed_df,
            FAIL,
            f"registry patch size {case.patch_size} != config {patch}",
            "the registry derives it from vision_config.patch_size: check the config",
        )
    elif missing:
        df = Item(
            "dummy_forward entry",
            seed_df,
            FAIL,
            "the dummy_forward hook cannot reach: " + "; ".join(missing),
            "extend src/parity/training/dummy_forward.py (MODALITIES) for this model",
        )
    else:
        gc = " (+ gradient checkpointing job)" if case.gradient_checkpointing else ""
        df = Item(
            "dummy_forward entry",
            seed_df,
            PASS,
            f"in {lists}, patch_size {patch}, hook reaches the encoders{gc}",
        )
    return [vit, df]


def collect(case_id: str, files: list[str]) -> tuple[int, list[str], str]:
    """pytest --collect-only with this interpreter (the project's env): (exit code, node ids, tail)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--collect-only",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--rootdir={ROOT}",
    ]
    proc = subprocess.run([*cmd, *files, "-k", case_id], cwd=ROOT, env=env, capture_output=True, text=True)
    nodes = [line.strip() for line in proc.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-2:])
    return proc.returncode, nodes, tail


def _collect_item(case: registry.Case, fix_hint: str = "") -> Item:
    seed = "pytest --collect-only -k <model> shows expected test cases"
    files = [SUITE_FILES[s] for s in case.suites]
    code, nodes, tail = collect(case.id, files)
    mine = {n for n in nodes if n.endswith(f"[{case.id}]")}
    expected = set(expected_nodes(case))
    where = f"{sys.executable} -m pytest --collect-only {' '.join(files)} -k {case.id}"
    if code not in (0, 5) or not nodes:
        why = "0 tests collected" if code == 5 or not nodes else f"pytest exit code {code}"
        fix = fix_hint or f"run `{where}` and fix the error it shows"
        return Item(
            "collection", seed, FAIL, f"{why} in this env ({_rel(Path(sys.executable))}): {tail}", fix
        )
    missing, extra = sorted(expected - mine), sorted(mine - expected)
    if missing or extra:
        detail = "; ".join(
            x
            for x in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(extra)}" if extra else "",
            )
            if x
        )
        return Item(
            "collection",
            seed,
            FAIL,
            detail,
            "the suites build their lists from the registry: check the entry",
        )
    return Item(
        "collection",
        seed,
        PASS,
        f"{len(mine)} cases collected in this env ({_rel(Path(sys.executable))}): "
        + ", ".join(n.split("::")[1] for n in sorted(mine)),
    )


def _run_items(case: registry.Case, queued: bool) -> list[Item]:
    status = QUEUED if queued else SKIP
    how = (
        "in the merged table at the end of this run"
        if queued
        else f"add --run (nox -s checklist -- {case.id} --run)"
    )
    items = [
        Item(
            "patch + e2e pass",
            "Tests pass: test_models_patch.py and test_e2e_parallel.py -k <model>",
            status,
            f"nox -s patch -- {case.id}; nox -s e2e -- {case.id}: {how}",
        )
    ]
    if case.family != "text":
        items.append(
            Item(
                "vlm_trainer pass",
                "VLM models: test_vlm_trainer.py -k <model> passes",
                status,
                f"nox -s vlm_trainer -- {case.id}: {how}",
            )
        )
        items.append(
            Item(
                "dummy_forward pass",
                "VLM / Omni: test_dummy_forward.py -k <model> passes",
                status,
                f"nox -s dummy_forward -- {case.id}: {how}",
            )
        )
    return items


def run_checklist(case_id: str, *, queued: bool = False, collection: bool = True) -> list[Item]:
    """Every item for one model id (a folder without registry entry is still checked where it can be)."""
    reg_item, case = _registry_item(case_id)
    toy_items, config, path = _toy_items(case_id, case)
    items = [*toy_items, reg_item]
    if case is None and path is not None:
        case = registry.case_from_config(case_id, path)  # derived facts, to check the rest anyway
    if case is None or config is None:
        return items
    items += [_moe_item(case, config), _unsupported_item(case), _e2e_item(case)]
    items += _multimodal_items(case, config)
    items.append(_sp_item(case, config))
    if collection:
        items.append(_collect_item(case, "" if reg_item.status == PASS else reg_item.fix))
    items += _run_items(case, queued)
    return items


def _rel(path: Path) -> str:
    try:
        return str(Path(os.path.abspath(path)).relative_to(ROOT))  # not resolve(): venv pythons are links
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nox -s checklist --", description="The onboarding checklist.")
    parser.add_argument("case_id", help="the model id (registry table / toy folder name without _toy)")
    parser.add_argument("--run", action="store_true", help="the session queues the suites after this")
    parser.add_argument("--no-collect", action="store_true", help="skip the pytest collection (faster)")
    args = parser.parse_args(argv)
    items = run_checklist(args.case_id, queued=args.run, collection=not args.no_collect)
    failed = [i for i in items if i.status == FAIL]
    print(f"checklist {args.case_id}: {len(items)} items, {len(failed)} failed")
    for number, item in enumerate(items, 1):
        print(f"{number:>2}. {item.line()}")
    if failed:
        print(f"checklist {args.case_id}: FAIL ({', '.join(i.name for i in failed)})")
    else:
        print(f"checklist {args.case_id}: PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
