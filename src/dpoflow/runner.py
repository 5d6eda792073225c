"""`dpoflow run`: the whole pipeline in this process, step after step, from one config.

Each step writes to <output_dir>/<run name>/<step>. A step whose inputs are unchanged (its config
sections, its upstream steps' keys, the content of external inputs, dpoflow's source) is reused:
<run>/.steps/<step>.json records the key it was built with. (A later issue moves this onto the Kubeflow local runner without changing what it produces.)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from dpoflow.config import Config, check_pipeline, config_dict, config_hash


@lru_cache(maxsize=1)
def code_hash() -> str:
    """Hash of dpoflow's own source: a code change invalidates reused step outputs."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _step_key(*parts) -> str:
    return hashlib.sha256(json.dumps([code_hash(), *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_fingerprint(location: str | None) -> str | None:
    """What a step's external input holds now, so edited files are never mistaken for unchanged ones.

    A local file or folder: its md5. Anything that can move without a local trace (a hub id, a
    models:/ alias): a fresh token, so steps that read it always rerun. None: nothing external.
    """
    from dpoflow.data.sources import tree_md5

    if location is None or location == "demo":
        return None
    if Path(location).exists():
        return tree_md5(Path(location))
    return f"unpinned-{uuid.uuid4()}"


def _data_fingerprint(cfg: Config) -> str | None:
    if cfg.data.dvc is not None:  # DVC's own md5 at the requested rev (a branch can move)
        from dpoflow.data.sources import dvc_lookup

        return dvc_lookup(cfg.data.dvc.repo, cfg.data.dvc.path, cfg.data.dvc.rev)[2]
    return content_fingerprint(cfg.data.source)


def beta_dir_name(beta: float) -> str:
    """`beta-0.1`, `beta-2.0`: the same names DVC's `foreach` gives the stages of dvc.yaml."""
    return f"beta-{beta}"


def run_step(name: str, out_dir: Path, key: str, fn: Callable[[], object], records: Path, log=print) -> float:
    """Run `fn` unless out_dir holds a finished output built with the same key. Returns its seconds
    (0 when reused).

    The record lives in `records` (<run>/.steps/), not in the step's folder, so that folder is
    byte-identical whether `dpoflow run` or `dvc repro` produced it."""
    marker = records / f"{name.replace(' ', '-')}.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        log(f"[{name}] inputs unchanged, reusing {out_dir}")
        return 0.0
    marker.unlink(missing_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"[{name}] running -> {out_dir}")
    fn()
    seconds = time.perf_counter() - started
    marker.write_text(json.dumps({"key": key, "seconds": round(seconds, 2)}) + "\n")
    return seconds


def step_dirs(cfg: Config) -> dict[str, Path]:
    """Where each step of a run reads and writes: <output_dir>/<run name>/<step>."""
    root = Path(cfg.run.output_dir) / cfg.run.name
    pairs = root / "data" if cfg.data.kind == "preferences" else root / "prefs"
    reference_model = root / "sft" / "model" if cfg.sft.enabled else Path(cfg.model.base or root / "base")
    return {"root": root, "data": root / "data", "pairs": pairs, "reference_model": reference_model,
            "reference": root / "reference"}


def run_pipeline(cfg: Config, log=print) -> dict:
    """data -> sft -> prefs -> reference -> (dpo -> eval) for each β -> summary.json."""
    from dpoflow.data.step import run_data
    from dpoflow.dpo.reference import run_reference
    from dpoflow.dpo.train import run_dpo
    from dpoflow.evaluation.evaluate import run_eval
    from dpoflow.evaluation.report import write_frontier
    from dpoflow.preferences import run_prefs
    from dpoflow.sft import run_sft

    check_pipeline(cfg)
    paths = step_dirs(cfg)
    root = paths["root"]
    root.mkdir(parents=True, exist_ok=True)
    if not cfg.sft.enabled and not Path(cfg.model.base).is_dir():
        # a models:/ URI or hub id as the reference: resolve it to a local folder once, so every step
        # (and the reference cache key, which hashes the weights) sees the same files
        from dpoflow.modeling import resolve_model_path

        paths["reference_model"] = Path(resolve_model_path(cfg.model.base))
        log(f"reference model {cfg.model.base} -> {paths['reference_model']}")
    # the resolved config of this run, beside its outputs (the hash is in summary.json too)
    (root / "config.json").write_text(json.dumps({"config_hash": config_hash(cfg), **config_dict(cfg)}, indent=2) + "\n")
    timings: dict[str, float] = {}

    def step(name, out_dir, key_parts, fn):
        timings[name] = run_step(name, out_dir, _step_key(*key_parts), fn, root / ".steps", log)

    data_key = [config_dict(cfg.data), cfg.run.seed, _data_fingerprint(cfg)]
    step("data", paths["data"], data_key, lambda: run_data(cfg.data, paths["data"], seed=cfg.run.seed))
    sft_key = data_key + [config_dict(cfg.sft), config_dict(cfg.model), content_fingerprint(cfg.model.base)]
    if cfg.sft.enabled:
        step("sft", root / "sft", sft_key, lambda: run_sft(cfg.sft, cfg.model, paths["data"], root / "sft", log=log))
    prefs_key = sft_key + [config_dict(cfg.prefs)]
    if cfg.data.kind != "preferences":
        step("prefs", paths["pairs"], prefs_key,
             lambda: run_prefs(cfg.prefs, paths["data"], paths["reference_model"], paths["pairs"], log=log))
    reference_key = prefs_key + [cfg.dpo.max_length, cfg.dpo.truncation]
    step("reference", paths["reference"], reference_key,
         lambda: run_reference(paths["pairs"], paths["reference_model"], paths["reference"],
                               max_length=cfg.dpo.max_length, truncation=cfg.dpo.truncation, log=log))

    results = {}
    for beta in cfg.run.betas:
        dpo_cfg = cfg.dpo.model_copy(update={"beta": beta})
        name = beta_dir_name(beta)
        dpo_dir, eval_dir = root / "dpo" / name, root / "eval" / name
        dpo_key = reference_key + [config_dict(dpo_cfg)]
        step(f"dpo {name}", dpo_dir, dpo_key,
             lambda: run_dpo(dpo_cfg, paths["pairs"], paths["reference_model"], dpo_dir,
                             reference_dir=paths["reference"], log=log))
        step(f"eval {name}", eval_dir, dpo_key + [config_dict(cfg.eval)],
             lambda: run_eval(cfg.eval, dpo_dir / "model", paths["reference_model"], paths["data"], eval_dir,
                              beta=beta, pairs_dir=paths["pairs"], max_length=cfg.dpo.max_length,
                              training_metrics=dpo_dir / "metrics.jsonl", log=log))
        results[name] = json.loads((eval_dir / "metrics.json").read_text())
    write_frontier(root / "frontier", results)

    summary = {"run": cfg.run.name, "config_hash": config_hash(cfg), "results": results,
               "timings_s": {k: round(v, 2) for k, v in timings.items()},
               "data": json.loads((paths["data"] / "stats.json").read_text())}
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.tracking.enabled:
        summary["mlflow_run_id"] = _track(cfg, paths, results)
    nan = float("nan")
    log(f"\nrun {cfg.run.name}: outputs in {root}")
    for name, m in results.items():
        log(f"  {name}: win rate {m['win_rate']:.3f} [{m['win_rate_ci_low']:.3f}, {m['win_rate_ci_high']:.3f}] over "
            f"{m['n_prompts']} prompts; reward margin {m.get('reward_margin', nan):+.3f}; KL {m['kl']:.2f}; "
            f"implicit accuracy {m.get('implicit_accuracy', nan):.3f} -> {root / 'dpo' / name / 'model'}")
    log(f"  reports: {root / 'eval'}/<beta>/report.html; frontier: {root / 'frontier' / 'frontier.html'}")
    log(f"  summary: {root / 'summary.json'}")
    if cfg.tracking.enabled:
        from dpoflow.tracking import tracking_uri

        log(f"  MLflow: run {summary['mlflow_run_id']} in experiment '{cfg.tracking.experiment}'; browse with "
            f"`mlflow ui --backend-store-uri {tracking_uri()}`")
    return summary


def _track(cfg: Config, paths: dict[str, Path], results: dict[str, dict]) -> str:
    """Log this run to MLflow from its outputs (so reused steps are logged as well)."""
    import pandas as pd

    from dpoflow.config import flatten
    from dpoflow.tracking import log_pipeline_run

    root = paths["root"]
    dataset = json.loads((paths["data"] / "dataset.json").read_text())
    reference = json.loads((paths["reference"] / "reference.json").read_text())
    tags = {"dpoflow.config_hash": config_hash(cfg), "dpoflow.data.md5": dataset["md5"],
            "dpoflow.data.rev": dataset.get("rev") or "", "dpoflow.data.source": dataset["source"],
            "dpoflow.ref_cache_key": reference["cache_key"],
            "dpoflow.kfp_run_id": os.environ.get("KFP_RUN_ID", "")}
    runs = {}
    for name in results:
        dpo_dir, eval_dir = root / "dpo" / name, root / "eval" / name
        runs[name] = {"params": {"dpo.beta": results[name]["beta"]}, "metrics_jsonl": dpo_dir / "metrics.jsonl",
                      "eval_metrics": results[name],
                      "artifacts": [eval_dir / "report.html", eval_dir / "metrics.json", dpo_dir / "train_summary.json"]}
    return log_pipeline_run(
        experiment=cfg.tracking.experiment, run_name=cfg.run.name,
        params={k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in flatten(config_dict(cfg)).items()},
        tags=tags,
        dataset={"frame": pd.read_parquet(paths["pairs"] / "train.parquet"), "name": f"{cfg.run.name}-pairs",
                 "source": str((paths["pairs"] / "train.parquet").resolve()), "digest": dataset["md5"][:36]},
        runs=runs,
        artifacts=[root / "config.json", root / "summary.json", root / "frontier" / "frontier.html",
                   paths["data"] / "stats.json"],
    )
