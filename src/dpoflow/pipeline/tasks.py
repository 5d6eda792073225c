"""What each KFP component of the training side runs (no kfp import here: components.py holds the
typed shells; the registry's tasks are in registry_tasks.py).

A task = resolve its inputs -> call the step function -> place the output where KFP expects it ->
record lineage (KFP artifact metadata, MLflow). Where outputs live and when one is reused: reuse.py;
the run folder's layout and thread counts: dpoflow.layout; the pipeline parameters: parameters.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dpoflow.config import Config, ConfigError, DpoConfig, config_dict, config_hash, flatten
from dpoflow.layout import beta_dir_name, round_rel, round_run_name, round_step_name, set_threads
from dpoflow.manifest import building
from dpoflow.pipeline.parameters import config_json, resolve_config
from dpoflow.pipeline.reuse import (
    content_fingerprint,
    copy_into,
    data_fingerprint,
    folder_of,
    path_of,
    point_to,
    produce,
    step_key,
)


def stop_reason(previous: dict, min_diversity: float) -> str:
    """Why an on-policy round must not run, given the previous round's evaluation ('' = go on): its
    policy's samples lost their diversity (distinct-2 below `min_diversity` × the reference's) — the
    sign of a policy exploiting its judge — or an earlier round already stopped."""
    if previous.get("stopped"):
        return previous["stopped"]
    ratio = previous.get("diversity_ratio")
    if ratio is not None and ratio < min_diversity:
        return (f"round {previous.get('round', '?')}'s policy samples have distinct-2 "
                f"{previous['distinct_2_policy']:.3f} = {ratio:.2f} x the reference's "
                f"{previous['distinct_2_reference']:.3f}, below run.min_diversity={min_diversity}: its diversity "
                "collapsed (judge exploitation); further rounds keep its policy")
    return ""


def _die_with_parent() -> None:
    """Local runner only: a task subprocess dies with `dpoflow run` (a SIGKILLed run leaves no orphan
    writing into the workspace while the rerun starts)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def setup_task(mlflow_uri: str, workspace: str, threads: int = 0) -> None:
    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    if workspace:
        _die_with_parent()
    set_threads(threads)


def run_config(config: str) -> Config:
    """The run's config as every task receives it: the fingerprint task resolved and validated it
    once and passed it on as one JSON string (`config_json`); each task reads the sections it uses."""
    return Config.model_validate_json(config)


FINGERPRINT_OUTPUTS = ["config", "data_md5", "parent_run_id"]


# ---- tasks ----------------------------------------------------------------------------------------

def fingerprint_task(*, config: str, flat: dict, config_overrides: str, dvc: tuple[str, str, str], workspace: str,
                     mlflow_uri: str, mlflow_run_id: str, compiled_rounds: int) -> dict:
    """Resolve and validate the run config, fingerprint the data (DVC's md5 at the rev, or the file's),
    open (or join) the MLflow parent run. Never cached: its outputs are what tells the cached steps
    below whether anything changed; its `config` is the one every later task reads (run_config)."""
    setup_task(mlflow_uri, workspace)
    cfg = resolve_config(config, flat, config_overrides, dvc)
    if cfg.run.rounds != compiled_rounds:
        raise ConfigError(f"run.rounds={cfg.run.rounds} but this pipeline was compiled with {compiled_rounds} on-policy "
                          f"round(s) (KFP unrolls them when the pipeline is built): compile it with "
                          f"`dpoflow compile --set run.rounds={cfg.run.rounds}` and upload that")
    md5 = data_fingerprint(cfg.data) or f"demo:{cfg.data.demo.n_reviews}:{cfg.data.demo.seed}"
    parent = ""
    if cfg.tracking.enabled:
        from dpoflow import mlflow_registry, tracking

        if not workspace and tracking.tracking_uri() == tracking.DEFAULT_TRACKING_URI:
            raise ConfigError("on a cluster, set the pipeline parameter mlflow_uri (e.g. http://dpoflow-mlflow:5000, "
                              "see manifests/) or config_overrides {\"tracking.enabled\": false, \"registry.enabled\": "
                              "false}: a sqlite file inside a pod is lost with the pod, and each task has its own")
        tracking.check_reachable()
        parent = mlflow_run_id or tracking.start_parent_run(cfg.tracking.experiment, cfg.run.name)
        tracking.log_parent(parent, params=flatten(config_dict(cfg)),
                            tags={"dpoflow.config_hash": config_hash(cfg), "dpoflow.data.md5": md5,
                                  "dpoflow.data.source": cfg.data.source,
                                  "dpoflow.kfp_run_id": os.environ.get("KFP_RUN_ID", "")})
        if cfg.registry.enabled:
            mlflow_registry.ensure_registered_model(cfg.registry.model_name)  # before the β tasks race to create it
    return {"config": config_json(cfg), "data_md5": md5, "parent_run_id": parent}


def data_task(*, config: str, data_md5: str, workspace: str, dataset) -> None:
    """Load + validate + split the data (under --storage artifacts cached by KFP on its inputs: the
    config and the data md5)."""
    from dpoflow.data.step import data_config_for_run, run_data

    setup_task("", workspace)
    cfg = run_config(config)
    data_cfg = data_config_for_run(cfg)
    key = step_key("data", config_dict(data_cfg), cfg.run.seed, data_md5)
    out = produce("data", "data", dataset, key, workspace, lambda d: run_data(data_cfg, d, seed=cfg.run.seed))
    stats = json.loads((out / "stats.json").read_text())
    info = json.loads((out / "dataset.json").read_text())
    dataset.metadata.update({"rows_in": stats["rows_in"], "kept": stats["kept"], "md5": info["md5"],
                             "rev": info.get("rev") or "", "source": info["source"],
                             "quarantined": sum(stats["quarantined"].values()) if stats["quarantined"] else 0})


def sft_task(*, config: str, data, workspace: str, reference_model) -> None:
    """The reference model: SFT of the base on the corpus, or (sft.enabled=false) the given base,
    resolved once to a local folder (a models:/ URI or hub id included)."""
    from dpoflow.modeling import resolve_model_path
    from dpoflow.sft import run_sft

    setup_task("", workspace)
    cfg = run_config(config)
    sft_cfg, model_cfg = cfg.sft, cfg.model
    upstream = data.metadata.get("dpoflow_key")
    if sft_cfg.enabled:
        key = step_key("sft", upstream, sft_cfg.model_dump_json(), model_cfg.model_dump_json(),
                       content_fingerprint(model_cfg.base))
        produce("sft", "sft", reference_model, key, workspace,
                lambda d: run_sft(sft_cfg, model_cfg, path_of(data), d))
        return
    base = Path(resolve_model_path(model_cfg.base)).resolve()
    target = Path(workspace) / "reference_model" if workspace else Path(reference_model.path)
    if target.exists() or target.is_symlink():
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    target.mkdir(parents=True)
    (target / "model").symlink_to(base) if workspace else shutil.copytree(base, target / "model")
    if workspace:
        point_to(reference_model, target)
    reference_model.metadata["dpoflow_key"] = step_key("sft", upstream, model_cfg.model_dump_json(),
                                                       content_fingerprint(str(base)))
    reference_model.metadata["base"] = model_cfg.base


def resolve_policy_init(uri: str) -> tuple[str, Path]:
    """(pinned URI, local folder) of model.policy_init: an alias is pinned to the version it points at
    now, so the pairs and the DPO start of one run come from the same weights."""
    from dpoflow.modeling import resolve_model_path

    if uri.startswith("models:/"):
        from dpoflow.mlflow_registry import pin_model_uri

        uri = pin_model_uri(uri)
    return uri, Path(resolve_model_path(uri)).resolve()


def prefs_task(*, config: str, data, reference_model, workspace: str, pairs) -> None:
    """Judged preference pairs sampled from the reference (the DPO paper's protocol) — or from
    model.policy_init when set (scheduled retraining continues from the champion) —, or the data's own
    pairs (prefs.enabled=false). With on-policy rounds, round 1 takes its share of the prompts."""
    from dpoflow.data.sources import tree_md5
    from dpoflow.preferences import run_prefs

    setup_task("", workspace)
    cfg = run_config(config)
    prefs_cfg, model_cfg, rounds = cfg.prefs, cfg.model, cfg.run.rounds
    if prefs_cfg.enabled:
        sampler, sampler_key, init_uri = path_of(reference_model, "model"), reference_model.metadata.get("dpoflow_key"), ""
        if model_cfg.policy_init:
            init_uri, sampler = resolve_policy_init(model_cfg.policy_init)
            sampler_key = tree_md5(sampler)
        shard = (0, rounds)
        key = step_key("prefs", data.metadata.get("dpoflow_key"), sampler_key, prefs_cfg.model_dump_json(),
                       *([shard] if rounds > 1 else []))
        produce("prefs", "prefs", pairs, key, workspace,
                lambda d: run_prefs(prefs_cfg, path_of(data), sampler, d, shard, init_uri))
        pairs.metadata.update({"policy_init": init_uri, "sampler": init_uri or "reference"})
    else:
        point_to(pairs, folder_of(data)) if workspace else copy_into(pairs.path, Path(data.path))
        pairs.metadata["dpoflow_key"] = data.metadata.get("dpoflow_key")
    frame_rows = {split: _rows(path_of(pairs, f"{split}.parquet")) for split in ("train", "eval")}
    pairs.metadata.update({f"{k}_pairs": v for k, v in frame_rows.items()})


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def reference_task(*, config: str, pairs, reference_model, workspace: str, reference, name: str = "reference",
                   rel: str = "reference", threads: int = 0) -> None:
    """The reference model's log-probs over every pair, once for the whole β sweep (or, in on-policy
    round r > 1, over that round's pairs of one β)."""
    from dpoflow.dpo.reference import run_reference

    setup_task("", workspace, threads)
    dpo_cfg = run_config(config).dpo
    key = step_key("reference", pairs.metadata.get("dpoflow_key"), reference_model.metadata.get("dpoflow_key"),
                   dpo_cfg.max_length, dpo_cfg.truncation)

    def compute(out_dir: Path):
        stopped = path_of(pairs, "stopped.json")
        if stopped.exists():  # a stopped round: nothing to score
            with building("reference", out_dir, config="stopped", inputs={"pairs": path_of(pairs)}) as (work, _):
                shutil.copy(stopped, work / "stopped.json")
                (work / "reference.json").write_text(json.dumps({"cache_key": ""}) + "\n")
            return
        run_reference(path_of(pairs), path_of(reference_model, "model"), out_dir, max_length=dpo_cfg.max_length,
                      truncation=dpo_cfg.truncation)

    out = produce(name, rel, reference, key, workspace, compute)
    reference.metadata["cache_key"] = json.loads((out / "reference.json").read_text())["cache_key"]


def round_prefs_task(*, config: str, beta: float, round: int, data, sampler, previous_results, workspace: str,
                     threads: int, pairs) -> None:
    """On-policy round `round` for one β: sample this round's share of the training prompts (and the
    eval prompts) from the previous round's policy, judge, build pairs — the prefs step unchanged.
    Stops (writes stopped.json, no pairs) when the previous round's samples lost their diversity."""
    from dpoflow.preferences import run_prefs

    setup_task("", workspace, threads)
    cfg = run_config(config)
    rounds = cfg.run.rounds
    previous = json.loads(path_of(previous_results, "metrics.json").read_text())
    reason = stop_reason(previous, cfg.run.min_diversity)
    prefs_cfg = cfg.prefs.model_copy(update={"seed": cfg.prefs.seed + 100 * (round - 1)})
    key = step_key("prefs", data.metadata.get("dpoflow_key"), sampler.metadata.get("dpoflow_key"),
                   config_dict(prefs_cfg), round, rounds, reason)

    def sample(out_dir: Path):
        if reason:
            with building("prefs", out_dir, config=reason, inputs={}) as (work, _):
                (work / "stopped.json").write_text(json.dumps({"round": round, "reason": reason}, indent=2) + "\n")
            print(f"round {round} beta {beta}: stopped: {reason}")
            return
        run_prefs(prefs_cfg, path_of(data), path_of(sampler, "model"), out_dir, shard=(round - 1, rounds),
                  sampler=f"round {round - 1} policy")

    produce(round_step_name("prefs", beta, round), round_rel("prefs", beta, round), pairs, key, workspace, sample)
    pairs.metadata.update({"round": round, "stopped": reason})


def round_reference_task(*, config: str, beta: float, round: int, pairs, reference_model, workspace: str, threads: int,
                         reference) -> None:
    reference_task(config=config, pairs=pairs, reference_model=reference_model, workspace=workspace,
                   reference=reference, name=round_step_name("reference", beta, round),
                   rel=round_rel("reference", beta, round), threads=threads)


def dpo_task(*, config: str, parent_run_id: str, beta: float, round: int, pairs, reference_model, reference,
             init_policy, data, gpus: int, threads: int, workspace: str, mlflow_uri: str, policy) -> None:
    """DPO for one β (and on-policy round). Training starts from `init_policy` (the previous round's
    policy; in round 1 the reference, or model.policy_init). Training metrics reach MLflow while it
    runs (a nested run `beta-<β>` — `round-<r>/beta-<β>` with rounds — under the parent, with system
    metrics and the training data as its input); a reused step is logged from its metrics.jsonl. The
    β run's id goes on in the policy's metadata. A stopped round passes its initial policy through."""
    from dpoflow.dpo.train import run_dpo

    setup_task(mlflow_uri, workspace, threads)
    cfg = run_config(config)
    data_md5 = data.metadata.get("md5", "")  # the data step's md5 of what it read (DVC's for DVC data)
    dpo_cfg, tracking_cfg = cfg.dpo.model_copy(update={"beta": beta}), cfg.tracking
    name = round_run_name(beta, round, cfg.run.rounds)
    init_dir, init_uri = path_of(init_policy, "model"), init_policy.metadata.get("policy_init", "")
    if round == 1 and pairs.metadata.get("policy_init"):  # the same (pinned) version the pairs came from
        init_uri, init_dir = resolve_policy_init(pairs.metadata["policy_init"])
    stopped = pairs.metadata.get("stopped", "")
    key = step_key("dpo", reference.metadata.get("dpoflow_key"), init_policy.metadata.get("dpoflow_key"), init_uri,
                   config_dict(dpo_cfg))
    run_id, live = "", None
    if tracking_cfg.enabled and parent_run_id:
        from dpoflow import tracking

        params = {f"dpo.{k}": v for k, v in flatten(config_dict(dpo_cfg)).items()}
        params.update({"data.md5": data_md5, "reference.cache_key": reference.metadata.get("cache_key", "")})
        if cfg.run.rounds > 1 or init_uri:
            started_from = init_uri or ("previous round" if round > 1 else "reference")
            params.update({"round": round, "rounds": cfg.run.rounds, "policy_init": started_from})
        run_id = tracking.start_child_run(parent_run_id, name, params=params, tags={
            "dpoflow.beta": beta, "dpoflow.round": round, "dpoflow.data.md5": data_md5,
            "dpoflow.config_hash": config_hash(cfg), "dpoflow.ref_cache_key": reference.metadata.get("cache_key", ""),
            **({"dpoflow.stopped": stopped} if stopped else {})})
        train_pairs = path_of(pairs, "train.parquet")
        dataset_name = f"{cfg.run.name}-pairs" + (f"-round-{round}-{beta_dir_name(beta)}" if round > 1 else "")
        for run in (run_id, parent_run_id) if train_pairs.exists() else ():
            tracking.log_dataset(run, train_pairs, name=dataset_name, digest=data_md5)
    reused = True

    def train(out_dir: Path):
        nonlocal live, reused
        reused = False
        if stopped:
            pass_through(init_dir, out_dir, stopped)
            return
        if dpo_cfg.nodes > 1:  # the nodes' metrics reach MLflow from metrics.jsonl, below
            _trainjob_dpo(dpo_cfg, path_of(pairs), path_of(reference_model, "model"), path_of(reference), init_dir, out_dir,
                          workspace, gpus)
            return
        if run_id:
            from dpoflow.tracking import LiveMetrics

            live = LiveMetrics(run_id, tracking_cfg.flush_every_s, out_dir / "unrecorded_metrics.jsonl",
                               system_metrics=tracking_cfg.system_metrics)
        if gpus > 1:
            _launch_dpo(dpo_cfg, path_of(pairs), path_of(reference_model, "model"), path_of(reference), out_dir, gpus, run_id,
                        init_dir)
        else:
            run_dpo(dpo_cfg, path_of(pairs), path_of(reference_model, "model"), out_dir, reference_dir=path_of(reference),
                    init_model_dir=init_dir, log_metrics=live)

    out = produce(round_step_name("dpo", beta, round), round_rel("dpo", beta, round), policy, key, workspace, train)
    if run_id:
        from dpoflow import tracking

        lost = live.close() if live is not None else 0
        if reused or lost or dpo_cfg.nodes > 1:  # replay from the step's own record
            tracking.log_metric_history(run_id, out / "metrics.jsonl")
        tracking.set_tags(run_id, {"dpoflow.reused": str(reused).lower()})
    summary = json.loads((out / "train_summary.json").read_text())
    policy.metadata.update({"beta": beta, "round": round, "steps": summary["steps"], "pairs": summary["pairs"],
                            "nodes": summary["nodes"], "processes": summary["processes"],
                            "mlflow_run_id": run_id, "policy_init": init_uri, "stopped": stopped})


def pass_through(init_dir: Path, out_dir: Path, reason: str) -> None:
    """A stopped on-policy round: its policy is the previous round's, unchanged, and says why."""
    with building("dpo", out_dir, config=reason, inputs={"init": init_dir}) as (work, _):
        shutil.copytree(init_dir, work / "model", dirs_exist_ok=True)
        (work / "metrics.jsonl").write_text("")
        summary = json.loads((init_dir.parent / "train_summary.json").read_text())
        summary.update({"steps": 0, "stopped": reason})
        (work / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _trainjob_dpo(cfg: DpoConfig, pairs_dir, model_dir, reference_dir, init_dir, out_dir: Path, workspace: str,
                  gpus: int) -> None:
    """dpo.nodes > 1: a Kubeflow Trainer TrainJob (trainjob.py) over the folder the task shares with
    the nodes: on a cluster the RWX volume the pod and the nodes both mount at /workspace (storage
    shared); here the run's workspace (mounted into the task container with --runner container), or
    the pipeline root every task container mounts at its own path (--storage artifacts:
    DPOFLOW_SHARED, with the engine's socket)."""
    from dpoflow.trainjob import WORKSPACE, in_cluster, node_image, run_dpo_trainjob

    shared = WORKSPACE if in_cluster() and workspace else workspace or os.environ.get("DPOFLOW_SHARED", "")
    if not shared:
        raise RuntimeError("dpo.nodes > 1 needs a volume this task shares with the nodes: on a cluster compile the "
                           "pipeline with shared storage (`dpoflow compile`, the default; not --storage artifacts) and "
                           "set the pipeline parameter workspace; here run it with `dpoflow run`; or set dpo.nodes=1")
    run_dpo_trainjob({"dpo": config_dict(cfg)}, pairs=pairs_dir, reference_model=model_dir,
                     reference_dir=reference_dir, init_model=init_dir,
                     out_dir=out_dir, root=Path(shared), nodes=cfg.nodes, processes_per_node=max(gpus, 1),
                     gpus=gpus > 0, image=node_image())


def _launch_dpo(cfg: DpoConfig, pairs_dir, model_dir, reference_dir, out_dir: Path, gpus: int, run_id: str,
                init_dir) -> None:
    """Several GPUs in this pod: `accelerate launch` of `dpoflow dpo` (DDP), the config written beside it."""
    import subprocess
    import sys

    import yaml

    config_file = out_dir / "dpo_config.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump({"dpo": config_dict(cfg)}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
               "-m", "dpoflow.cli", "dpo", "-c", str(config_file), "--pairs", str(pairs_dir), "--reference-model",
               str(model_dir), "--reference-dir", str(reference_dir), "--init-model", str(init_dir), "--out", str(out_dir)]
    env = {**os.environ, "DPOFLOW_LAUNCHED": "1", "DPOFLOW_MLFLOW_RUN_ID": run_id}
    subprocess.run(command, check=True, env=env)


def eval_task(*, config: str, beta: float, round: int, policy, reference_model, data, pairs, threads: int, workspace: str,
              mlflow_uri: str, results, metrics, report) -> None:
    """Win rate vs the reference (± 95 % CI), reward margin, KL, report. Figures go to the KFP
    Metrics artifact, the HTML report to the UI, both to the β's MLflow run."""
    from dpoflow.evaluation.evaluate import run_eval

    setup_task(mlflow_uri, workspace, threads)
    cfg = run_config(config)
    eval_cfg, dpo_cfg, run_id = cfg.eval, cfg.dpo, policy.metadata.get("mlflow_run_id", "")
    key = step_key("eval", policy.metadata.get("dpoflow_key"), config_dict(eval_cfg))

    extra = {}
    if cfg.run.rounds > 1 or policy.metadata.get("policy_init"):  # single-round files stay as dvc writes them
        stopped = policy.metadata.get("stopped", "")
        extra = {"round": round, **({"stopped": stopped} if stopped else {})}
    out = produce(round_step_name("eval", beta, round), round_rel("eval", beta, round), results, key, workspace,
                  lambda d: run_eval(eval_cfg, path_of(policy, "model"), path_of(reference_model, "model"), path_of(data), d,
                                     beta=beta, pairs_dir=path_of(pairs), max_length=dpo_cfg.max_length,
                                     training_metrics=path_of(policy, "metrics.jsonl"), extra_metrics=extra))
    figures = json.loads((out / "metrics.json").read_text())
    for metric, value in figures.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(metric, float(value))
    shutil.copy(out / "report.html", report.path)  # small: the UI shows it
    results.metadata.update({k: figures[k] for k in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "kl",
                                                      "reward_margin", "eval_set_hash", "round") if k in figures})
    if run_id:
        from dpoflow import tracking

        tracking.log_metrics(run_id, {f"eval/{k}": v for k, v in figures.items()})
        tracking.log_artifacts(run_id, [out / "report.html", out / "metrics.json",
                                        path_of(policy, "train_summary.json")])
        tracking.end_run(run_id)  # the β run spans training and evaluation
