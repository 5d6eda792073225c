"""What the registry's KFP components run: register each β's policy (alias candidate), select the
sweep's best, gate it, promote it (compare-and-set). The rules themselves are registry.py's."""

from __future__ import annotations

import json
from pathlib import Path

from dpoflow.config import Config, config_hash
from dpoflow.pipeline.reuse import path_of
from dpoflow.pipeline.tasks import run_config, setup_task


def register_task(*, config: str, parent_run_id: str, policy, results, data, reference, mlflow_uri: str) -> str:
    """A registered version (alias `candidate`) with lineage and quality tags. Returns the version."""
    from dpoflow.data.sources import tree_md5
    from dpoflow.image import build_info, image_lineage
    from dpoflow.registry import run_register
    from dpoflow.tracking import git_sha

    setup_task(mlflow_uri, "")
    cfg = run_config(config)
    data_md5 = data.metadata.get("md5", "")
    registry_cfg, run_id = cfg.registry, policy.metadata.get("mlflow_run_id", "")
    if not registry_cfg.enabled or not run_id:
        return ""
    figures = json.loads(path_of(results, "metrics.json").read_text())
    train = json.loads(path_of(policy, "train_summary.json").read_text())
    base = cfg.model.base
    lineage = {"beta": figures["beta"], "round": int(policy.metadata.get("round", 1)),
               "base_model": base or f"built from scratch (preset {cfg.model.preset})",
               # a local base's content (a folder's DVC-style .dir md5, a GGUF file's md5); a models:/ base is its URI
               "base_md5": tree_md5(Path(base)) if base and Path(base).exists() else "",
               "policy_init": policy.metadata.get("policy_init", ""), "data.md5": data_md5,
               "data.rev": data.metadata.get("rev", ""), "data.source": data.metadata.get("source", ""),
               "git_sha": git_sha() or build_info().get("git_sha", "unknown"), "config_hash": config_hash(cfg),
               "ref_cache_key": reference.metadata.get("cache_key", ""), "loss_type": train["loss_type"],
               "parent_run_id": parent_run_id, "mlflow_run_id": run_id, **image_lineage()}
    version = run_register(path_of(policy, "model"), figures, lineage, model_name=registry_cfg.model_name,
                           run_id=run_id)
    from dpoflow import mlflow_registry

    mlflow_registry.set_version_tags(registry_cfg.model_name, version, {"dpoflow.parent_run_id": parent_run_id})
    return version


def select_task(*, config: str, versions: list, parent_run_id: str, mlflow_uri: str) -> str:
    from dpoflow import mlflow_registry
    from dpoflow.registry import run_select

    setup_task(mlflow_uri, "")
    registry_cfg = run_config(config).registry
    versions = [v for v in versions if v]
    if not registry_cfg.enabled or not versions:
        return ""
    version = run_select(registry_cfg.model_name, versions, max_kl=registry_cfg.max_kl,
                         min_diversity=registry_cfg.min_diversity, max_length_ratio=registry_cfg.max_length_ratio)
    if version:
        mlflow_registry.set_version_tags(registry_cfg.model_name, version, {"dpoflow.selected_in": parent_run_id})
    return version


def _gate(cfg: Config, version: str, data) -> bool:
    """The gate; a champion evaluated on another set is judged head to head against the candidate
    on this run's prompts."""
    from dpoflow.registry import run_gate

    registry_cfg = cfg.registry

    def duel(champion_version: str) -> dict:
        from dpoflow.evaluation.evaluate import head_to_head
        from dpoflow.mlflow_registry import download_model

        name = registry_cfg.model_name
        return head_to_head(cfg.eval, download_model(f"models:/{name}/{version}"),
                            download_model(f"models:/{name}/{champion_version}"), path_of(data))

    return run_gate(registry_cfg.model_name, version, min_win_rate=registry_cfg.min_win_rate, head_to_head=duel,
                    min_diversity=registry_cfg.min_diversity, max_length_ratio=registry_cfg.max_length_ratio)


def gate_task(*, config: str, version: str, data, mlflow_uri: str) -> str:
    """'pass' or 'fail' (the reasons are tags on the version)."""
    setup_task(mlflow_uri, "")
    cfg = run_config(config)
    if not cfg.registry.enabled:
        return "fail"
    return "pass" if _gate(cfg, version, data) else "fail"


def promote_task(*, config: str, version: str, data, mlflow_uri: str) -> str:
    """Compare-and-set promotion: when another run moved `champion` since this run's gate, the
    candidate is gated again against the new champion first."""
    from dpoflow.registry import run_promote

    setup_task(mlflow_uri, "")
    cfg = run_config(config)
    return json.dumps(run_promote(cfg.registry.model_name, version, regate=lambda: _gate(cfg, version, data)))
