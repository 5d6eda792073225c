"""What each KFP component runs (no kfp import here: components.py holds the typed shells).

A task = resolve its inputs -> call the step function -> place the output where KFP expects it ->
record lineage (KFP artifact metadata, MLflow). Two places for outputs:

- **workspace** (the local runner, `dpoflow run`): the step writes into `<workspace>/<step>` — the
  same folders `dvc repro` writes — and the KFP output artifact is a symlink to it. A step whose
  inputs are unchanged is reused: `<workspace>/.steps/<step>.json` records the key it was built with
  (dpoflow's source, its config section, its upstream steps' keys, the content of external inputs).
  A killed run, started again, redoes only what did not finish.
- **no workspace** (a cluster): the step writes into the artifact folder that KFP uploads; reuse is
  KFP's caching, keyed on the inputs (the data md5 is one of them, so new data re-runs the steps).

Every output artifact carries `dpoflow_key` in its metadata; a downstream key includes it, so a
change anywhere upstream invalidates everything below it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from dpoflow.config import (
    Config,
    ConfigError,
    DataConfig,
    DpoConfig,
    EvalConfig,
    ModelConfig,
    PrefsConfig,
    RegistryConfig,
    SftConfig,
    apply_overrides,
    check_pipeline,
    config_dict,
    config_hash,
    flatten,
)
from dpoflow.manifest import ManifestError, building, verify

# pipeline parameter -> config key. The UI shows these flat, typed parameters; everything else is
# reachable through `config_overrides` (a JSON object of dotted keys), validated like params.yaml.
FLAT_PARAMETERS = {
    "base_model": "model.base", "data_kind": "data.kind", "data_source": "data.source",
    "betas": "run.betas", "loss_type": "dpo.loss_type", "learning_rate": "dpo.learning_rate",
    "max_steps": "dpo.max_steps", "judge": "eval.judge", "min_win_rate": "registry.min_win_rate",
    "model_name": "registry.model_name", "dpo_nodes": "dpo.nodes",
}


# ---- config ---------------------------------------------------------------------------------------

def resolve_config(config_json: str, flat: dict, overrides_json: str = "{}", dvc: tuple[str, str, str] = ("", "", "")
                   ) -> Config:
    """The run's config: the base config (params.yaml as JSON), then the flat pipeline parameters
    (an empty string keeps the base value), then `config_overrides`; validated like params.yaml, so a
    wrong key fails here with the key's name. `dvc` = (repo, path, rev): read the data through DVC."""
    raw = json.loads(config_json or "{}")
    settings = [f"{FLAT_PARAMETERS[name]}={json.dumps(value)}" for name, value in flat.items()
                if value not in ("", None)]
    repo, path, rev = dvc
    if repo:
        dvc_source = {"repo": repo, "path": path or raw.get("data", {}).get("source"), "rev": rev or None}
        settings.append(f"data.dvc={json.dumps(dvc_source)}")
    try:
        overrides = json.loads(overrides_json or "{}")
    except json.JSONDecodeError as error:
        raise ConfigError(f"config_overrides is not JSON: {error}") from None
    if not isinstance(overrides, dict):
        raise ConfigError('config_overrides must be a JSON object of dotted keys, e.g. {"dpo.max_steps": 200}')
    settings += [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    from pydantic import ValidationError

    from dpoflow.config import _format_validation_error

    try:
        cfg = Config.model_validate(apply_overrides(raw, settings))
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, "pipeline parameters")) from None
    check_pipeline(cfg)
    return cfg


def pipeline_arguments(cfg: Config) -> dict:
    """The pipeline's arguments that reproduce `cfg` (the compiled defaults come from params.yaml)."""
    flat = flatten(config_dict(cfg))
    arguments = {name: flat[key] for name, key in FLAT_PARAMETERS.items()}
    arguments["base_model"] = arguments["base_model"] or ""
    arguments["config"] = json.dumps(config_dict(cfg), sort_keys=True)
    return arguments


# ---- workspace and reuse ------------------------------------------------------------------------

@lru_cache(maxsize=1)
def code_hash() -> str:
    """Hash of dpoflow's own source: a code change invalidates reused step outputs."""
    digest = hashlib.sha256()
    package = Path(__file__).parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def step_key(*parts) -> str:
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
    return f"unpinned-{os.urandom(8).hex()}"


def data_fingerprint(cfg: DataConfig) -> str | None:
    if cfg.dvc is not None:  # DVC's own md5 at the requested rev (a branch can move)
        from dpoflow.data.sources import dvc_lookup

        return dvc_lookup(cfg.dvc.repo, cfg.dvc.path, cfg.dvc.rev)[2]
    return content_fingerprint(cfg.source)


def beta_dir_name(beta: float) -> str:
    """`beta-0.1`, `beta-2.0`: the same names DVC's `foreach` gives the stages of dvc.yaml."""
    return f"beta-{beta}"


def round_rel(step: str, beta: float, round: int) -> str:
    """Workspace folder of a β step of on-policy round `round`: round 1 keeps the single-round names
    (dpo/beta-0.5, as dvc.yaml writes them); round r > 1 lives in round-<r>/beta-<β>/<step>."""
    if round == 1:
        return f"{step}/{beta_dir_name(beta)}"
    return f"round-{round}/{beta_dir_name(beta)}/{step}"


def round_step_name(step: str, beta: float, round: int) -> str:
    """`dpo beta-0.5` (round 1, as before rounds existed), `dpo round-2 beta-0.5`: log lines, .steps/ records."""
    return f"{step} {beta_dir_name(beta)}" if round == 1 else f"{step} round-{round} {beta_dir_name(beta)}"


def round_run_name(beta: float, round: int, rounds: int) -> str:
    """Name of the β run (MLflow, summary.json): beta-0.5, or round-2/beta-0.5 when there are rounds."""
    return beta_dir_name(beta) if rounds == 1 else f"round-{round}/{beta_dir_name(beta)}"


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


def step_dirs(cfg: Config) -> dict[str, Path]:
    """Where each step of a run reads and writes: <output_dir>/<run name>/<step> (as dvc.yaml says)."""
    root = Path(cfg.run.output_dir) / cfg.run.name
    pairs = root / "data" if cfg.data.kind == "preferences" else root / "prefs"
    reference_model = root / "sft" / "model" if cfg.sft.enabled else Path(cfg.model.base or root / "base")
    return {"root": root, "data": root / "data", "pairs": pairs, "reference_model": reference_model,
            "reference": root / "reference", "dpo": root / "dpo" / beta_dir_name(cfg.dpo.beta),
            "eval": root / "eval" / beta_dir_name(cfg.dpo.beta)}


def run_step(name: str, out_dir: Path, key: str, fn: Callable[[], object], records: Path, log=print) -> float:
    """Run `fn` unless out_dir holds a finished output built with the same key. Returns its seconds
    (0 when reused). The record lives in `records` (<run>/.steps/), not in the step's folder, so that
    folder is byte-identical whether `dpoflow run` or `dvc repro` produced it."""
    marker = records / f"{name.replace(' ', '-')}.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key and out_dir.exists():
        try:
            verify(out_dir)
            log(f"[{name}] inputs unchanged, reusing {out_dir}")
            return 0.0
        except ManifestError as error:
            log(f"[{name}] not reusable: {error}; running it again")
    marker.unlink(missing_ok=True)
    records.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"[{name}] running -> {out_dir}")
    fn()
    seconds = time.perf_counter() - started
    marker.write_text(json.dumps({"key": key, "seconds": round(seconds, 2)}) + "\n")
    return seconds


def _link(artifact_path: str, target: Path) -> None:
    """Make the KFP artifact path point at `target` (a symlink locally; a copy where KFP uploads)."""
    path = Path(artifact_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.symlink_to(Path(target).resolve(), target_is_directory=Path(target).is_dir())


def _copy_into(artifact_path: str, target: Path) -> None:
    path = Path(artifact_path)
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(target, path, symlinks=False)


def _in(artifact, *parts: str) -> Path:
    """An input artifact's folder as the step should see it: the workspace folder behind the symlink,
    relative to the project when inside it — the same path string `dvc repro` passes, so outputs that
    record an input path stay byte-identical between `dpoflow run` and `dvc repro`."""
    path = Path(artifact.path, *parts).resolve()
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def produce(name: str, rel: str, artifact, key: str, workspace: str, fn: Callable[[Path], object], log=print) -> Path:
    """Run step `name` (fn(out_dir)) into <workspace>/<rel>, reused when `key` is unchanged, and link
    the artifact to it; with no workspace, into the artifact folder itself. Returns the folder."""
    if workspace:
        out_dir = Path(workspace) / rel
        if out_dir.is_relative_to(Path.cwd()):
            out_dir = out_dir.relative_to(Path.cwd())
        run_step(name, out_dir, key, lambda: fn(out_dir), Path(workspace) / ".steps", log)
        _link(artifact.path, out_dir)
    else:
        out_dir = Path(artifact.path)
        fn(out_dir)
    artifact.metadata["dpoflow_key"] = key
    return out_dir


def beta_threads(n_betas: int) -> int:
    """CPU threads of each β task: kfp's local runner runs two β iterations at once, so each gets half
    the cores. `dpoflow dpo`/`eval` (the DVC stages) use the same count: CPU float reductions depend
    on the thread count, and `dpoflow run` and `dvc repro` must write the same bytes."""
    return max(1, (os.cpu_count() or 1) // min(n_betas, 2))


def set_threads(threads: int) -> None:
    """Tasks that run side by side (the β loop) share the machine's cores instead of each taking all."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _die_with_parent() -> None:
    """Local runner only: a task subprocess dies with `dpoflow run` (a SIGKILLed run leaves no orphan
    writing into the workspace while the rerun starts)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _setup(mlflow_uri: str, workspace: str, threads: int = 0) -> None:
    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    if workspace:
        _die_with_parent()
    set_threads(threads)


def _model(cls, config_json: str):
    return cls.model_validate_json(config_json)


DATA_OUTPUTS = ["model_cfg", "sft_cfg", "prefs_cfg", "dpo_cfg", "eval_cfg", "registry_cfg"]
FINGERPRINT_OUTPUTS = ["config", "data_md5", "parent_run_id"]


# ---- tasks ----------------------------------------------------------------------------------------

def fingerprint_task(*, config: str, flat: dict, config_overrides: str, dvc: tuple[str, str, str], workspace: str,
                     mlflow_uri: str, mlflow_run_id: str, compiled_rounds: int, run_info) -> dict:
    """Resolve and validate the run config, fingerprint the data (DVC's md5 at the rev, or the file's),
    open (or join) the MLflow parent run. Never cached: its outputs are what tells the cached steps
    below whether anything changed. `run_info` (an artifact: parent run, md5, config sections) is
    what the β tasks read."""
    _setup(mlflow_uri, workspace)
    cfg = resolve_config(config, flat, config_overrides, dvc)
    if cfg.run.rounds != compiled_rounds:
        raise ConfigError(f"run.rounds={cfg.run.rounds} but this pipeline was compiled with {compiled_rounds} on-policy "
                          f"round(s) (KFP unrolls them when the pipeline is built): compile it with "
                          f"`dpoflow compile --set run.rounds={cfg.run.rounds}` and upload that")
    md5 = data_fingerprint(cfg.data) or f"demo:{cfg.data.demo.n_reviews}:{cfg.data.demo.seed}"
    parent = ""
    if cfg.tracking.enabled:
        from dpoflow import tracking

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
            tracking.ensure_registered_model(cfg.registry.model_name)  # before the β tasks race to create it
    resolved = {"config_hash": config_hash(cfg), **config_dict(cfg)}
    Path(run_info.path).parent.mkdir(parents=True, exist_ok=True)
    Path(run_info.path).write_text(json.dumps({"parent_run_id": parent, "data_md5": md5, "config": resolved}) + "\n")
    run_info.metadata.update({"parent_run_id": parent, "data_md5": md5, "config_hash": config_hash(cfg)})
    return {"config": json.dumps(config_dict(cfg), sort_keys=True), "data_md5": md5, "parent_run_id": parent}


def _run_info(artifact) -> tuple[Config, str, str]:
    """(config, parent run id, data md5) from the fingerprint task's artifact. (The β tasks read them
    from an artifact, not from task-output parameters: kfp 2.17's local runner replaces every
    task-output parameter of a ParallelFor iteration by the loop item.)"""
    info = json.loads(Path(artifact.path).read_text())
    config = {k: v for k, v in info["config"].items() if k != "config_hash"}
    return Config.model_validate(config), info["parent_run_id"], info["data_md5"]


def data_task(*, config: str, data_md5: str, workspace: str, dataset) -> dict:
    """Load + validate + split the data (cached by KFP on its inputs: the config and the data md5).
    Returns the per-step config sections the later tasks take."""
    from dpoflow.data.step import data_config_for_run, run_data

    _setup("", workspace)
    cfg = Config.model_validate_json(config)
    data_cfg = data_config_for_run(cfg)
    key = step_key(config_dict(data_cfg), cfg.run.seed, data_md5)
    out = produce("data", "data", dataset, key, workspace, lambda d: run_data(data_cfg, d, seed=cfg.run.seed))
    stats = json.loads((out / "stats.json").read_text())
    info = json.loads((out / "dataset.json").read_text())
    dataset.metadata.update({"rows_in": stats["rows_in"], "kept": stats["kept"], "md5": info["md5"],
                             "rev": info.get("rev") or "", "source": info["source"],
                             "quarantined": sum(stats["quarantined"].values()) if stats["quarantined"] else 0})
    return {f"{name}_cfg": getattr(cfg, name).model_dump_json() for name in ("model", "sft", "prefs", "dpo", "eval",
                                                                            "registry")}


def sft_task(*, sft: str, model: str, data, data_md5: str, workspace: str, reference_model) -> None:
    """The reference model: SFT of the base on the corpus, or (sft.enabled=false) the given base,
    resolved once to a local folder (a models:/ URI or hub id included)."""
    from dpoflow.modeling import resolve_model_path
    from dpoflow.sft import run_sft

    _setup("", workspace)
    sft_cfg, model_cfg = _model(SftConfig, sft), _model(ModelConfig, model)
    upstream = data.metadata.get("dpoflow_key")
    if sft_cfg.enabled:
        key = step_key(upstream, sft, model, content_fingerprint(model_cfg.base))
        produce("sft", "sft", reference_model, key, workspace,
                lambda d: run_sft(sft_cfg, model_cfg, _in(data), d))
        return
    base = Path(resolve_model_path(model_cfg.base)).resolve()
    target = Path(workspace) / "reference_model" if workspace else Path(reference_model.path)
    if target.exists() or target.is_symlink():
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    target.mkdir(parents=True)
    (target / "model").symlink_to(base) if workspace else shutil.copytree(base, target / "model")
    if workspace:
        _link(reference_model.path, target)
    reference_model.metadata["dpoflow_key"] = step_key(upstream, model, content_fingerprint(str(base)))
    reference_model.metadata["base"] = model_cfg.base


def resolve_policy_init(uri: str) -> tuple[str, Path]:
    """(pinned URI, local folder) of model.policy_init: an alias is pinned to the version it points at
    now, so the pairs and the DPO start of one run come from the same weights."""
    from dpoflow.modeling import resolve_model_path

    if uri.startswith("models:/"):
        from dpoflow.tracking import pin_model_uri

        uri = pin_model_uri(uri)
    return uri, Path(resolve_model_path(uri)).resolve()


def prefs_task(*, prefs: str, model: str, rounds: int, data, reference_model, workspace: str, pairs) -> None:
    """Judged preference pairs sampled from the reference (the DPO paper's protocol) — or from
    model.policy_init when set (scheduled retraining continues from the champion) —, or the data's own
    pairs (prefs.enabled=false). With on-policy rounds, round 1 takes its share of the prompts."""
    from dpoflow.data.sources import tree_md5
    from dpoflow.preferences import run_prefs

    _setup("", workspace)
    prefs_cfg, model_cfg = _model(PrefsConfig, prefs), _model(ModelConfig, model)
    if prefs_cfg.enabled:
        sampler, sampler_key, init_uri = _in(reference_model, "model"), reference_model.metadata.get("dpoflow_key"), ""
        if model_cfg.policy_init:
            init_uri, sampler = resolve_policy_init(model_cfg.policy_init)
            sampler_key = tree_md5(sampler)
        shard = (0, rounds)
        key = step_key(data.metadata.get("dpoflow_key"), sampler_key, prefs, *([shard] if rounds > 1 else []))
        produce("prefs", "prefs", pairs, key, workspace, lambda d: run_prefs(prefs_cfg, _in(data), sampler, d, shard, init_uri))
        pairs.metadata.update({"policy_init": init_uri, "sampler": init_uri or "reference"})
    else:
        (_link if workspace else _copy_into)(pairs.path, Path(data.path))
        pairs.metadata["dpoflow_key"] = data.metadata.get("dpoflow_key")
    frame_rows = {split: _rows(Path(pairs.path) / f"{split}.parquet") for split in ("train", "eval")}
    pairs.metadata.update({f"{k}_pairs": v for k, v in frame_rows.items()})


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def reference_task(*, dpo: str, pairs, reference_model, workspace: str, reference, name: str = "reference",
                   rel: str = "reference", threads: int = 0) -> None:
    """The reference model's log-probs over every pair, once for the whole β sweep (or, in on-policy
    round r > 1, over that round's pairs of one β)."""
    from dpoflow.dpo.reference import run_reference

    _setup("", workspace, threads)
    dpo_cfg = _model(DpoConfig, dpo)
    key = step_key(pairs.metadata.get("dpoflow_key"), reference_model.metadata.get("dpoflow_key"),
                   dpo_cfg.max_length, dpo_cfg.truncation)

    def compute(out_dir: Path):
        stopped = _in(pairs, "stopped.json")
        if stopped.exists():  # a stopped round: nothing to score
            with building("reference", out_dir, config="stopped", inputs={"pairs": _in(pairs)}) as (work, _):
                shutil.copy(stopped, work / "stopped.json")
                (work / "reference.json").write_text(json.dumps({"cache_key": ""}) + "\n")
            return
        run_reference(_in(pairs), _in(reference_model, "model"), out_dir, max_length=dpo_cfg.max_length,
                      truncation=dpo_cfg.truncation)

    out = produce(name, rel, reference, key, workspace, compute)
    reference.metadata["cache_key"] = json.loads((out / "reference.json").read_text())["cache_key"]


def round_prefs_task(*, beta: float, round: int, rounds: int, run_info, data, sampler, previous_results,
                     workspace: str, threads: int, pairs) -> None:
    """On-policy round `round` for one β: sample this round's share of the training prompts (and the
    eval prompts) from the previous round's policy, judge, build pairs — the prefs step unchanged.
    Stops (writes stopped.json, no pairs) when the previous round's samples lost their diversity."""
    from dpoflow.preferences import run_prefs

    _setup("", workspace, threads)
    cfg = _run_info(run_info)[0]
    previous = json.loads((Path(previous_results.path) / "metrics.json").read_text())
    reason = stop_reason(previous, cfg.run.min_diversity)
    prefs_cfg = cfg.prefs.model_copy(update={"seed": cfg.prefs.seed + 100 * (round - 1)})
    key = step_key(data.metadata.get("dpoflow_key"), sampler.metadata.get("dpoflow_key"),
                   config_dict(prefs_cfg), round, rounds, reason)

    def sample(out_dir: Path):
        if reason:
            with building("prefs", out_dir, config=reason, inputs={}) as (work, _):
                (work / "stopped.json").write_text(json.dumps({"round": round, "reason": reason}, indent=2) + "\n")
            print(f"round {round} beta {beta}: stopped: {reason}")
            return
        run_prefs(prefs_cfg, _in(data), _in(sampler, "model"), out_dir, shard=(round - 1, rounds),
                  sampler=f"round {round - 1} policy")

    produce(round_step_name("prefs", beta, round), round_rel("prefs", beta, round), pairs, key, workspace, sample)
    pairs.metadata.update({"round": round, "stopped": reason})


def round_reference_task(*, beta: float, round: int, run_info, pairs, reference_model, workspace: str, threads: int,
                         reference) -> None:
    cfg = _run_info(run_info)[0]
    reference_task(dpo=cfg.dpo.model_dump_json(), pairs=pairs, reference_model=reference_model, workspace=workspace,
                   reference=reference, name=round_step_name("reference", beta, round),
                   rel=round_rel("reference", beta, round), threads=threads)


def dpo_task(*, beta: float, round: int, run_info, pairs, reference_model, reference, init_policy, data, gpus: int,
             threads: int, workspace: str, mlflow_uri: str, policy) -> None:
    """DPO for one β (and on-policy round). Training starts from `init_policy` (the previous round's
    policy; in round 1 the reference, or model.policy_init). Training metrics reach MLflow while it
    runs (a nested run `beta-<β>` — `round-<r>/beta-<β>` with rounds — under the parent, with system
    metrics and the training data as its input); a reused step is logged from its metrics.jsonl. The
    β run's id goes on in the policy's metadata. A stopped round passes its initial policy through."""
    from dpoflow.dpo.train import run_dpo

    _setup(mlflow_uri, workspace, threads)
    cfg, parent_run_id = _run_info(run_info)[:2]
    data_md5 = data.metadata.get("md5", "")  # the data step's md5 of what it read (DVC's for DVC data)
    dpo_cfg, tracking_cfg = cfg.dpo.model_copy(update={"beta": beta}), cfg.tracking
    name = round_run_name(beta, round, cfg.run.rounds)
    init_dir, init_uri = _in(init_policy, "model"), init_policy.metadata.get("policy_init", "")
    if round == 1 and pairs.metadata.get("policy_init"):  # the same (pinned) version the pairs came from
        init_uri, init_dir = resolve_policy_init(pairs.metadata["policy_init"])
    stopped = pairs.metadata.get("stopped", "")
    key = step_key(reference.metadata.get("dpoflow_key"), init_policy.metadata.get("dpoflow_key"), init_uri,
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
        train_pairs = Path(pairs.path) / "train.parquet"
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
            _trainjob_dpo(dpo_cfg, _in(pairs), _in(reference_model, "model"), _in(reference), init_dir, out_dir,
                          workspace, gpus)
            return
        if run_id:
            from dpoflow.tracking import LiveMetrics

            live = LiveMetrics(run_id, tracking_cfg.flush_every_s, out_dir / "unrecorded_metrics.jsonl",
                               system_metrics=tracking_cfg.system_metrics)
        if gpus > 1:
            _launch_dpo(dpo_cfg, _in(pairs), _in(reference_model, "model"), _in(reference), out_dir, gpus, run_id,
                        init_dir)
        else:
            run_dpo(dpo_cfg, _in(pairs), _in(reference_model, "model"), out_dir, reference_dir=_in(reference),
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
    the nodes: the run's workspace (process runner), or the pipeline root every task container
    mounts at its own path (container runner: DPOFLOW_SHARED, with the engine's socket)."""
    from dpoflow.trainjob import node_image, run_dpo_trainjob

    shared = workspace or os.environ.get("DPOFLOW_SHARED", "")
    if not shared:
        raise RuntimeError("dpo.nodes > 1 needs a folder this task shares with the nodes: run it with `dpoflow run` "
                           "(--runner process or container); on a cluster, run `dpoflow dpo --nodes N` against the "
                           "RWX volume (manifests/trainer/), or set dpo.nodes=1")
    run_dpo_trainjob({"dpo": config_dict(cfg)}, pairs=pairs_dir, reference_model=model_dir,
                     reference_dir=reference_dir, init_model=init_dir,
                     out_dir=out_dir, root=Path(shared), nodes=cfg.nodes, processes_per_node=max(gpus, 1),
                     image=node_image())


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


def eval_task(*, beta: float, round: int, run_info, policy, reference_model, data, pairs, threads: int, workspace: str,
              mlflow_uri: str, results, metrics, report) -> None:
    """Win rate vs the reference (± 95 % CI), reward margin, KL, report. Figures go to the KFP
    Metrics artifact, the HTML report to the UI, both to the β's MLflow run."""
    from dpoflow.evaluation.evaluate import run_eval

    _setup(mlflow_uri, workspace, threads)
    cfg = _run_info(run_info)[0]
    eval_cfg, dpo_cfg, run_id = cfg.eval, cfg.dpo, policy.metadata.get("mlflow_run_id", "")
    key = step_key(policy.metadata.get("dpoflow_key"), config_dict(eval_cfg))

    extra = {}
    if cfg.run.rounds > 1 or policy.metadata.get("policy_init"):  # single-round files stay as dvc writes them
        stopped = policy.metadata.get("stopped", "")
        extra = {"round": round, **({"stopped": stopped} if stopped else {})}
    out = produce(round_step_name("eval", beta, round), round_rel("eval", beta, round), results, key, workspace,
                  lambda d: run_eval(eval_cfg, _in(policy, "model"), _in(reference_model, "model"), _in(data), d,
                                     beta=beta, pairs_dir=_in(pairs), max_length=dpo_cfg.max_length,
                                     training_metrics=_in(policy, "metrics.jsonl"), extra_metrics=extra))
    figures = json.loads((out / "metrics.json").read_text())
    for metric, value in figures.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(metric, float(value))
    _link(report.path, out / "report.html") if workspace else shutil.copy(out / "report.html", report.path)
    results.metadata.update({k: figures[k] for k in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "kl",
                                                      "reward_margin", "eval_set_hash", "round") if k in figures})
    if run_id:
        from dpoflow import tracking

        tracking.log_metrics(run_id, {f"eval/{k}": v for k, v in figures.items()})
        tracking.log_artifacts(run_id, [out / "report.html", out / "metrics.json",
                                        Path(policy.path) / "train_summary.json"])
        tracking.end_run(run_id)  # the β run spans training and evaluation


def register_task(*, run_info, policy, results, data, reference, mlflow_uri: str) -> str:
    """A registered version (alias `candidate`) with lineage and quality tags. Returns the version."""
    from dpoflow.image import build_info, image_lineage
    from dpoflow.registry import run_register
    from dpoflow.tracking import _git_sha

    _setup(mlflow_uri, "")
    cfg, parent_run_id = _run_info(run_info)[:2]
    data_md5 = data.metadata.get("md5", "")
    registry_cfg, run_id = cfg.registry, policy.metadata.get("mlflow_run_id", "")
    if not registry_cfg.enabled or not run_id:
        return ""
    figures = json.loads((Path(results.path) / "metrics.json").read_text())
    train = json.loads((Path(policy.path) / "train_summary.json").read_text())
    lineage = {"beta": figures["beta"], "round": int(policy.metadata.get("round", 1)),
               "base_model": cfg.model.base or f"built from scratch (preset {cfg.model.preset})",
               "policy_init": policy.metadata.get("policy_init", ""), "data.md5": data_md5,
               "data.rev": data.metadata.get("rev", ""), "data.source": data.metadata.get("source", ""),
               "git_sha": _git_sha() or build_info().get("git_sha", "unknown"), "config_hash": config_hash(cfg),
               "ref_cache_key": reference.metadata.get("cache_key", ""), "loss_type": train["loss_type"],
               "parent_run_id": parent_run_id, "mlflow_run_id": run_id, **image_lineage()}
    version = run_register(Path(policy.path) / "model", figures, lineage, model_name=registry_cfg.model_name,
                           run_id=run_id)
    from dpoflow import tracking

    tracking.set_version_tags(registry_cfg.model_name, version, {"dpoflow.parent_run_id": parent_run_id})
    return version


def select_task(*, registry: str, versions: list, parent_run_id: str, mlflow_uri: str) -> str:
    from dpoflow import tracking
    from dpoflow.registry import run_select

    _setup(mlflow_uri, "")
    registry_cfg = _model(RegistryConfig, registry)
    versions = [v for v in versions if v]
    if not registry_cfg.enabled or not versions:
        return ""
    version = run_select(registry_cfg.model_name, versions, max_kl=registry_cfg.max_kl,
                         min_diversity=registry_cfg.min_diversity, max_length_ratio=registry_cfg.max_length_ratio)
    if version:
        tracking.set_version_tags(registry_cfg.model_name, version, {"dpoflow.selected_in": parent_run_id})
    return version


def _gate(registry_cfg: RegistryConfig, eval_cfg: EvalConfig, version: str, data) -> bool:
    """The gate; a champion evaluated on another set is judged head to head against the candidate
    on this run's prompts."""
    from dpoflow.registry import run_gate

    def duel(champion_version: str) -> dict:
        from dpoflow.evaluation.evaluate import head_to_head
        from dpoflow.tracking import download_model

        name = registry_cfg.model_name
        return head_to_head(eval_cfg, download_model(f"models:/{name}/{version}"),
                            download_model(f"models:/{name}/{champion_version}"), data.path)

    return run_gate(registry_cfg.model_name, version, min_win_rate=registry_cfg.min_win_rate, head_to_head=duel,
                    min_diversity=registry_cfg.min_diversity, max_length_ratio=registry_cfg.max_length_ratio)


def gate_task(*, registry: str, eval: str, version: str, data, mlflow_uri: str) -> str:
    """'pass' or 'fail' (the reasons are tags on the version)."""
    _setup(mlflow_uri, "")
    registry_cfg = _model(RegistryConfig, registry)
    if not registry_cfg.enabled:
        return "fail"
    return "pass" if _gate(registry_cfg, _model(EvalConfig, eval), version, data) else "fail"


def promote_task(*, registry: str, eval: str, version: str, data, mlflow_uri: str) -> str:
    """Compare-and-set promotion: when another run moved `champion` since this run's gate, the
    candidate is gated again against the new champion first."""
    from dpoflow.registry import run_promote

    _setup(mlflow_uri, "")
    registry_cfg = _model(RegistryConfig, registry)
    return json.dumps(run_promote(registry_cfg.model_name, version,
                                  regate=lambda: _gate(registry_cfg, _model(EvalConfig, eval), version, data)))
