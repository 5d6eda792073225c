"""The model lifecycle after the β sweep: register → select → gate → promote (and rollback).

    register  every β's policy becomes a version of `registry.model_name` with lineage and quality tags
              (the registry answers: which data, code, config, reference, how good) and alias `candidate`
    select    the sweep's best version (rule in `select_best`); `candidate` then points at it
    gate      `champion` only for a version that clears the bar (rule in `gate_decision`)
    promote   alias `champion` -> the version, compare-and-set: only if `champion` is still the version
              the gate compared against (else gated again); the old champion keeps `previous-champion`
    rollback  `champion` <-> `previous-champion` (`dpoflow promote --rollback`)

The rules are pure functions of the versions' tags, so they are tested without a store; the step
functions around them read and write the registry through tracking.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dpoflow.manifest import model_sha

# tags every registered version carries (also the columns `select` compares)
QUALITY = ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "kl", "reward_margin", "implicit_accuracy", "n_prompts",
           "diversity_ratio", "length_policy", "length_reference")


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("dpoflow", "torch", "transformers", "tokenizers", "accelerate", "datasets", "mlflow", "kfp"):
        try:
            found[f"dpoflow.lib.{package}"] = version(package)
        except PackageNotFoundError:
            pass
    return found


def run_register(model_dir, eval_metrics: dict, lineage: dict, *, model_name: str, run_id: str, log=print) -> str:
    """Register the policy in `model_dir` (safetensors + tokenizer) under `model_name` with alias
    `candidate`; `lineage` = tags such as data md5/rev, config hash, reference, β (prefixed
    `dpoflow.`). The same weights registered again reuse their version. Returns the version."""
    from dpoflow import mlflow_registry
    from dpoflow.serving import pyfunc_files

    sha = model_sha(Path(model_dir))
    tags = {**{f"dpoflow.{k}": v for k, v in lineage.items()},
            **{f"dpoflow.{k}": eval_metrics[k] for k in QUALITY if eval_metrics.get(k) is not None},
            "dpoflow.eval_set_hash": eval_metrics.get("eval_set_hash", ""), "dpoflow.model_sha": sha,
            "dpoflow.status": "candidate", **_library_versions()}
    existing = [v for v in mlflow_registry.model_versions(model_name) if v["tags"].get("dpoflow.model_sha") == sha]
    if existing:
        version = existing[-1]["version"]
        mlflow_registry.add_model_files(existing[-1]["run_id"], pyfunc_files())  # registered before they carried MLmodel
        log(f"register: these weights are already {model_name} version {version}; reusing it")
    else:
        version = mlflow_registry.register_version(str(model_dir), model_name, run_id=run_id, tags=tags,
                                                   beside=pyfunc_files())  # `mlflow models serve` answers
        log(f"register: {model_name} version {version} (β {lineage.get('beta')}, win rate "
            f"{eval_metrics['win_rate']:.3f}) -> alias candidate")
    mlflow_registry.set_alias(model_name, "candidate", version)
    write_card(model_name, version)
    return version


def model_card(name: str, version: str, tags: dict) -> str:
    """The version's model card (markdown, the registry UI's description): what it was trained from,
    how good it is and with what certainty, what the gate decided and why, and where it was built."""
    def tag(key: str, default: str = "-") -> str:
        return str(tags.get(f"dpoflow.{key}", default))

    def figure(key: str, digits: int = 3) -> str:
        value = tags.get(f"dpoflow.{key}")
        return f"{float(value):.{digits}f}" if value not in (None, "") else "-"

    lines = [f"# {name} v{version}: DPO policy (β {tag('beta')}, loss {tag('loss_type')}, round {tag('round', '1')})",
             "", f"Status: **{tag('status')}**.", "", "## Trained from",
             f"- base model: {tag('base_model')}" + (f" (md5 {tag('base_md5')})" if tags.get("dpoflow.base_md5") else ""),
             f"- data: md5 {tag('data.md5')}, rev {tag('data.rev')}, source {tag('data.source')}",
             f"- reference log-probs cache key: {tag('ref_cache_key')}; started from: {tag('policy_init') or 'the reference'}",
             "", "## Evaluation (held-out prompts, against the reference)",
             f"- win rate {figure('win_rate')} (95 % interval {figure('win_rate_ci_low')}–{figure('win_rate_ci_high')}) "
             f"on {tag('n_prompts')} prompts; reward margin {figure('reward_margin')}, implicit accuracy "
             f"{figure('implicit_accuracy')}",
             f"- KL(policy ‖ reference) {figure('kl')}",
             f"- diversity: distinct-2 {figure('diversity_ratio', 2)} × the reference's; mean completion length "
             f"{figure('length_policy', 1)} vs {figure('length_reference', 1)} tokens",
             "", "## Gate", f"- decision: {tag('gate', 'not gated yet')}"]
    lines += [f"- {reason}" for reason in tags.get("dpoflow.gate_reasons", "").split("; ") if reason]
    if "dpoflow.promote" in tags:
        lines.append(f"- promotion: {tag('promote')}")
    lines += ["", "## Lineage", f"- git {tag('git_sha')}, config hash {tag('config_hash')}",
              f"- image {tag('image')} (id {tag('image_id', '') or '-'}, git {tag('image_git_sha')})",
              f"- MLflow run {tag('mlflow_run_id')} (parent {tag('parent_run_id')})",
              f"- weights sha {tag('model_sha')}; " + ", ".join(
                  f"{k.removeprefix('dpoflow.lib.')} {v}" for k, v in sorted(tags.items()) if k.startswith("dpoflow.lib."))]
    return "\n".join(lines) + "\n"


def write_card(model_name: str, version: str) -> None:
    """(Re)write a version's model card from its tags: after register, gate, promote and rollback."""
    from dpoflow import mlflow_registry

    found = mlflow_registry.model_version(model_name, version)
    if found is not None:
        mlflow_registry.set_version_description(model_name, str(version), model_card(model_name, str(version), found["tags"]))


def _hack_figures(row: dict) -> tuple[float, float]:
    """(distinct-2 as a fraction of the reference's, mean length as a multiple of the reference's); NaN
    where the row does not carry the figures."""
    return (row.get("diversity_ratio", math.nan),
            row.get("length_policy", math.nan) / row.get("length_reference", math.nan))


def _hacked(row: dict, min_diversity: float, max_length_ratio: float | None) -> bool:
    """The gate's judge-hack checks (where the row carries the figures): collapsed or padded samples."""
    diversity, growth = _hack_figures(row)
    return bool((min_diversity and diversity < min_diversity) or (max_length_ratio and growth > max_length_ratio))


def select_best(rows: list[dict], max_kl: float | None = None, *, min_diversity: float = 0.0,
                max_length_ratio: float | None = None) -> tuple[dict | None, str]:
    """The sweep's best candidate: the highest lower bound of the win-rate interval (the figure we
    are most sure of), among candidates within the KL budget whose samples the gate would not call a
    judge hack (so a hacked β does not hide a sound one from the gate); ties go to the lower KL.
    Returns (row, reason); row is None when no candidate qualifies."""
    within = [r for r in rows if max_kl is None or r["kl"] <= max_kl]
    if not within:
        return None, f"no candidate within registry.max_kl={max_kl} (KLs: {[round(r['kl'], 3) for r in rows]})"
    sound = [r for r in within if not _hacked(r, min_diversity, max_length_ratio)] or within
    best = sorted(sound, key=lambda r: (-r["win_rate_ci_low"], r["kl"]))[0]
    reason = (f"highest win-rate interval lower bound {best['win_rate_ci_low']:.3f} (β {best['beta']}, win rate "
              f"{best['win_rate']:.3f}, KL {best['kl']:.3f})")
    if len(within) < len(rows):
        reason += f"; {len(rows) - len(within)} candidate(s) above registry.max_kl={max_kl} skipped"
    if len(sound) < len(within):
        reason += (f"; {len(within) - len(sound)} candidate(s) below registry.min_diversity={min_diversity} or above "
                   f"registry.max_length_ratio={max_length_ratio} skipped")
    return best, reason


def gate_decision(candidate: dict, min_win_rate: float, champion: dict | None = None,
                  head_to_head: dict | None = None, *, min_diversity: float = 0.0,
                  max_length_ratio: float | None = None) -> tuple[bool, list[str]]:
    """Whether `candidate` may become champion, with a reason per check:
      1. win rate vs the reference >= min_win_rate;
      2. the lower bound of its 95 % interval > 0.5 (it beats the reference, not just by luck);
      2b. not a judge hack: its samples' distinct-2 >= min_diversity x the reference's, and their mean
         length <= max_length_ratio x the reference's (checked where the version carries the figures);
      3. when a champion exists, not worse than it on the same evaluation set: with the same
         eval-set hash, the champion's win rate is not above the candidate's interval; otherwise a
         head-to-head judged comparison (candidate vs champion) whose interval is not below 0.5.
    """
    reasons, passed = [], True

    def check(ok: bool, text: str):
        nonlocal passed
        passed &= ok
        reasons.append(("pass: " if ok else "fail: ") + text)

    check(candidate["win_rate"] >= min_win_rate,
          f"win rate {candidate['win_rate']:.3f} vs registry.min_win_rate {min_win_rate}")
    check(candidate["win_rate_ci_low"] > 0.5, f"win-rate interval lower bound {candidate['win_rate_ci_low']:.3f} > 0.5")
    diversity, growth = _hack_figures(candidate)
    if min_diversity and not math.isnan(diversity):
        check(diversity >= min_diversity, f"distinct-2 {diversity:.2f} x the reference's vs registry.min_diversity "
              f"{min_diversity}")
    if max_length_ratio and not math.isnan(growth):
        check(growth <= max_length_ratio, f"mean completion length {growth:.2f} x the reference's vs "
              f"registry.max_length_ratio {max_length_ratio}")
    if champion is not None:
        if head_to_head is None and champion.get("eval_set_hash") != candidate.get("eval_set_hash"):
            check(False, f"champion v{champion['version']} was evaluated on another set and no head-to-head "
                  "comparison was run")
        elif head_to_head is not None:
            check(head_to_head["win_rate_ci_high"] >= 0.5,
                  f"head-to-head vs champion v{champion['version']}: win rate {head_to_head['win_rate']:.3f} "
                  f"[{head_to_head['win_rate_ci_low']:.3f}, {head_to_head['win_rate_ci_high']:.3f}] not below 0.5")
        else:
            check(champion["win_rate"] <= candidate["win_rate_ci_high"],
                  f"champion v{champion['version']} win rate {champion['win_rate']:.3f} on the same eval set is "
                  f"not above the candidate's interval high {candidate['win_rate_ci_high']:.3f}")
    else:
        reasons.append("pass: no champion yet")
    return passed, reasons


def _row(version: dict) -> dict:
    tags = version["tags"]
    row = {"version": version["version"], "beta": float(tags.get("dpoflow.beta", "nan")),
           "eval_set_hash": tags.get("dpoflow.eval_set_hash", "")}
    for key in QUALITY:
        row[key] = float(tags[f"dpoflow.{key}"]) if f"dpoflow.{key}" in tags else float("nan")
    return row


def run_select(model_name: str, versions: list[str], *, max_kl: float | None, min_diversity: float = 0.0,
               max_length_ratio: float | None = None, log=print) -> str:
    """Pick the sweep's best among `versions`; tag it with the table of all and the reason; point
    `candidate` at it. Returns its version, or "" when none qualifies."""
    from dpoflow import mlflow_registry

    wanted = {str(v) for v in versions}
    rows = [_row(v) for v in mlflow_registry.model_versions(model_name) if v["version"] in wanted]
    best, reason = select_best(rows, max_kl, min_diversity=min_diversity, max_length_ratio=max_length_ratio)
    table = json.dumps([{k: r[k] for k in ("version", "beta", "win_rate", "win_rate_ci_low", "kl")} for r in rows])
    if best is None:
        log(f"select: {reason}")
        return ""
    mlflow_registry.set_version_tags(model_name, best["version"], {"dpoflow.selected": "true",
                                                           "dpoflow.select_reason": reason,
                                                           "dpoflow.sweep": table[:4900]})
    mlflow_registry.set_alias(model_name, "candidate", best["version"])
    log(f"select: {model_name} v{best['version']}: {reason}")
    return best["version"]


def run_gate(model_name: str, version: str, *, min_win_rate: float, head_to_head=None, min_diversity: float = 0.0,
             max_length_ratio: float | None = None, log=print) -> bool:
    """Decide whether `version` may become champion; the decision and its reasons become tags.
    `head_to_head(champion_version) -> win-rate metrics` judges the candidate against the champion
    on this run's eval set; it is called only when the champion's figures are for another set."""
    from dpoflow import mlflow_registry

    if not version:
        log("gate: nothing selected; champion unchanged")
        return False
    candidate = _row(mlflow_registry.model_version(model_name, version))
    champion_version = mlflow_registry.version_by_alias(model_name, "champion")
    champion, duel = None, None
    if champion_version is not None and champion_version["version"] != version:
        champion = _row(champion_version)
        against_reference, _ = gate_decision(candidate, min_win_rate)
        if against_reference and champion["eval_set_hash"] != candidate["eval_set_hash"] and head_to_head:
            log(f"gate: champion v{champion['version']} was evaluated on another set: judging head to head")
            duel = head_to_head(champion["version"])
    passed, reasons = gate_decision(candidate, min_win_rate, champion, duel, min_diversity=min_diversity,
                                    max_length_ratio=max_length_ratio)
    if champion_version is not None and champion_version["version"] == version:
        passed, reasons = False, ["already the champion: nothing to promote"]
    # what promote compares and sets against: the champion this decision was made against
    mlflow_registry.set_version_tags(model_name, version, {"dpoflow.gate": "pass" if passed else "fail",
                                                     "dpoflow.gate_reasons": "; ".join(reasons),
                                                     "dpoflow.gated_against": champion["version"] if champion
                                                     else "none"})
    write_card(model_name, version)
    log(f"gate: {'PASS' if passed else 'FAIL'} for {model_name} v{version}: " + "; ".join(reasons))
    return passed


def run_promote(model_name: str, version: str, *, regate=None, force: bool = False, log=print) -> dict:
    """Compare-and-set: `champion` -> version only if `champion` still points where it did when the
    version was gated (tag `dpoflow.gated_against`). Two runs that overlap may both pass the gate
    against the same champion; the second to promote finds the champion moved and calls `regate()`
    (the gate again, now against the new champion) and promotes only if that passes. The check and
    the move happen under the registry's alias lock. The former champion keeps `previous-champion`.
    `force` skips the check (an operator's `dpoflow promote --force`)."""
    from dpoflow import mlflow_registry

    with mlflow_registry.alias_lock(model_name, holder=f"promote of {model_name} v{version}"):
        old = mlflow_registry.version_by_alias(model_name, "champion")
        current = old["version"] if old else "none"
        gated_against = mlflow_registry.model_version(model_name, version)["tags"].get("dpoflow.gated_against")
        if not force and gated_against != current:
            log(f"promote: {model_name} champion is v{current}, not v{gated_against} as when v{version} was gated: "
                "gating again against it")
            if regate is None or not regate():
                mlflow_registry.set_version_tags(model_name, version, {
                    "dpoflow.promote": f"refused: the champion moved from v{gated_against} to v{current} and the "
                                       "gate against it did not pass"})
                write_card(model_name, version)
                log(f"promote: v{version} not promoted; champion stays v{current}")
                return {"champion": old["version"] if old else None, "previous_champion": None, "promoted": False}
        if old is not None and old["version"] != version:
            mlflow_registry.set_alias(model_name, "previous-champion", old["version"])
            mlflow_registry.set_version_tags(model_name, old["version"], {"dpoflow.status": "previous-champion"})
        mlflow_registry.set_alias(model_name, "champion", version)
        mlflow_registry.set_version_tags(model_name, version, {"dpoflow.status": "champion", "dpoflow.promote": (
            "forced" if force else f"champion v{current} -> v{version}")})
    for changed in {version, old["version"] if old else version}:
        write_card(model_name, changed)
    log(f"promote: {model_name} v{version} is champion" + (f" (previous: v{old['version']})" if old else ""))
    return {"champion": version, "previous_champion": old["version"] if old else None, "promoted": True}


def rollback(model_name: str, log=print) -> dict:
    """Swap `champion` and `previous-champion` (one command undoes a promotion)."""
    from dpoflow import mlflow_registry

    with mlflow_registry.alias_lock(model_name, holder=f"rollback of {model_name}"):
        previous = mlflow_registry.version_by_alias(model_name, "previous-champion")
        current = mlflow_registry.version_by_alias(model_name, "champion")
        if previous is None:
            raise ValueError(f"{model_name} has no 'previous-champion' version to roll back to")
        mlflow_registry.set_alias(model_name, "champion", previous["version"])
        mlflow_registry.set_version_tags(model_name, previous["version"], {"dpoflow.status": "champion"})
        if current is not None:
            mlflow_registry.set_alias(model_name, "previous-champion", current["version"])
            mlflow_registry.set_version_tags(model_name, current["version"], {"dpoflow.status": "rolled-back"})
    if current is not None:
        write_card(model_name, current["version"])
    write_card(model_name, previous["version"])
    log(f"rollback: {model_name} champion v{current['version'] if current else '-'} -> v{previous['version']}")
    return {"champion": previous["version"], "previous_champion": current["version"] if current else None}
