"""What each `dpoflow` subcommand does (cli.py holds their arguments): a thin call of the step
function, or of the pipeline, registry, serving and bench entry points.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dpoflow.config import ConfigError, config_dict, config_hash, load_config
from dpoflow.layout import beta_threads, set_threads, step_dirs


def _out_dir(args, cfg, step: str) -> Path:
    """--out, else where `dpoflow run` and dvc.yaml put this step (dpo/eval: per β)."""
    return Path(args.out) if args.out else step_dirs(cfg).get(step, Path(cfg.run.output_dir) / cfg.run.name / step)


def cmd_config_show(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(config_dict(cfg), indent=2))
    print(f"config_hash: {config_hash(cfg)}")
    return 0


def cmd_data(args) -> int:
    from dpoflow.data.step import data_config_for_run, run_data

    cfg = load_config(args.config, args.overrides)
    if args.source:  # assigned, not parsed as YAML: any path is taken literally (validated on assignment)
        cfg.data.source = args.source
    if args.mode:
        cfg.data.mode = args.mode
    out_dir = _out_dir(args, cfg, "data")
    result = run_data(data_config_for_run(cfg), out_dir, seed=cfg.run.seed)
    stats = result.stats
    print(f"data: {stats['rows_in']} rows in, {stats['kept']} kept, quarantined {stats['quarantined'] or 'none'}")
    print(f"data: splits {stats['splits']} -> {out_dir}")
    if stats["quarantined"]:
        print(f"data: bad rows with reasons in {out_dir / 'quarantine.jsonl'}")
    return 0


def _needs_launch(args) -> bool:
    launched = os.environ.get("DPOFLOW_LAUNCHED") or "WORLD_SIZE" in os.environ
    return (args.num_processes > 1 or bool(args.accelerate_config)) and not launched


def cmd_sft(args) -> int:
    from dpoflow.sft import run_sft

    if _needs_launch(args):
        return _relaunch(args.num_processes, args.accelerate_config)
    cfg = load_config(args.config, args.overrides)
    run_sft(cfg.sft, cfg.model, args.data or step_dirs(cfg)["data"], _out_dir(args, cfg, "sft"), resume=args.resume)
    return 0


def cmd_prefs(args) -> int:
    from dpoflow.preferences import run_prefs

    cfg = load_config(args.config, args.overrides)
    if cfg.run.rounds > 1:
        raise ConfigError(f"run.rounds={cfg.run.rounds}: on-policy rounds run through `dpoflow run` (the KFP pipeline "
                          "unrolls them); the single steps and dvc.yaml's stages are one offline round")
    paths = step_dirs(cfg)
    sampler = args.model or _init_model(cfg.model.policy_init) or paths["reference_model"]
    run_prefs(cfg.prefs, args.data or paths["data"], sampler, _out_dir(args, cfg, "prefs"))
    return 0


def cmd_reference(args) -> int:
    from dpoflow.dpo.reference import run_reference

    cfg = load_config(args.config, args.overrides)
    paths = step_dirs(cfg)
    run_reference(args.pairs or paths["pairs"], args.model or paths["reference_model"], _out_dir(args, cfg, "reference"),
                  max_length=cfg.dpo.max_length, truncation=cfg.dpo.truncation, cache_dir=args.cache_dir)
    return 0


def _relaunch(num_processes: int, accelerate_config: str | None) -> int:
    """Re-run this command under N processes: accelerate launch on GPUs (or with a config file for
    FSDP/DeepSpeed), torchrun with gloo on CPU (`accelerate launch --cpu` would start only one)."""
    import subprocess

    import torch

    skip = {"--num-processes", "--accelerate-config"}
    argv, previous = [], ""
    for arg in sys.argv[1:]:
        if arg not in skip and previous not in skip:
            argv.append(arg)
        previous = arg
    if accelerate_config:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
        if num_processes > 1:
            launcher += ["--num_processes", str(num_processes)]
    elif torch.cuda.is_available():
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes)]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes)]
    return subprocess.call([*launcher, "-m", "dpoflow.cli", *argv], env={**os.environ, "DPOFLOW_LAUNCHED": "1"})


def cmd_dpo(args) -> int:
    from dpoflow.dpo.train import run_dpo

    overrides = args.overrides + ([f"dpo.nodes={args.nodes}"] if args.nodes else [])
    cfg = load_config(args.config, overrides)
    if cfg.dpo.nodes > 1 and not os.environ.get("DPOFLOW_LAUNCHED"):
        return _dpo_trainjob(args, cfg)
    if _needs_launch(args):
        return _relaunch(args.num_processes, args.accelerate_config)
    if not os.environ.get("DPOFLOW_LAUNCHED"):  # one process: the thread count `dpoflow run` gives a β task
        set_threads(beta_threads(len(cfg.run.betas)))
    paths = step_dirs(cfg)
    out_dir = _out_dir(args, cfg, "dpo")
    live = _live_metrics(out_dir)
    summary = run_dpo(cfg.dpo, args.pairs or paths["pairs"], args.reference_model or paths["reference_model"], out_dir,
                      reference_dir=args.reference_dir or paths["reference"], resume=args.resume, log_metrics=live,
                      init_model_dir=_init_model(args.init_model or cfg.model.policy_init))
    if live is not None:
        live.close()
    if summary:
        print(f"dpo: {summary['steps']} steps, {summary['s_per_step']} s/step, {summary['tokens_per_s']} tokens/s "
              f"-> {out_dir / 'model'}")
    return 0


def _dpo_trainjob(args, cfg) -> int:
    """`dpoflow dpo` with dpo.nodes > 1: the same command on every node of a TrainJob."""
    from dpoflow.trainjob import run_dpo_trainjob

    paths = step_dirs(cfg)
    out_dir = _out_dir(args, cfg, "dpo")
    init = _init_model(args.init_model or cfg.model.policy_init)
    job = run_dpo_trainjob(config_dict(cfg), pairs=Path(args.pairs or paths["pairs"]),
                           reference_model=Path(args.reference_model or paths["reference_model"]),
                           reference_dir=Path(args.reference_dir or paths["reference"]),
                           init_model=Path(init) if init else None, out_dir=out_dir,
                           root=Path(args.shared) if args.shared else paths["root"], nodes=cfg.dpo.nodes,
                           processes_per_node=args.num_processes, image=args.image, resume=args.resume)
    print(f"dpo: TrainJob {job['name']} ({job['nodes']} nodes x {job['processes_per_node']} process(es)) in "
          f"{job['seconds']} s -> {out_dir / 'model'}")
    return 0


def _init_model(uri: str | None):
    if not uri:
        return None
    from dpoflow.modeling import resolve_model_path

    return resolve_model_path(uri)


def _live_metrics(out_dir: Path):
    """Metrics to the MLflow run a launcher named (DPOFLOW_MLFLOW_RUN_ID), from the main process only."""
    run_id = os.environ.get("DPOFLOW_MLFLOW_RUN_ID")
    if not run_id or os.environ.get("RANK", "0") != "0":
        return None
    from dpoflow.tracking import LiveMetrics

    return LiveMetrics(run_id, unrecorded_path=out_dir / "unrecorded_metrics.jsonl")


def cmd_eval(args) -> int:
    from dpoflow.evaluation.evaluate import run_eval

    cfg = load_config(args.config, args.overrides)
    set_threads(beta_threads(len(cfg.run.betas)))  # as `dpoflow run` runs a β's evaluation
    paths = step_dirs(cfg)
    policy = Path(args.policy) if args.policy else paths["dpo"] / "model"
    run_eval(cfg.eval, policy, args.reference_model or paths["reference_model"], args.data or paths["data"],
             _out_dir(args, cfg, "eval"), beta=cfg.dpo.beta, pairs_dir=args.pairs or paths["pairs"],
             max_length=cfg.dpo.max_length, training_metrics=policy.parent / "metrics.jsonl")
    return 0


def cmd_frontier(args) -> int:
    from dpoflow.evaluation.report import write_frontier

    cfg = load_config(args.config, args.overrides)
    root = step_dirs(cfg)["root"]
    results = {}
    for beta in cfg.run.betas:
        metrics = root / "eval" / f"beta-{beta}" / "metrics.json"
        if not metrics.exists():
            raise FileNotFoundError(f"{metrics} does not exist: evaluate β={beta} first (dpoflow eval --set dpo.beta={beta})")
        results[f"beta-{beta}"] = json.loads(metrics.read_text())
    write_frontier(_out_dir(args, cfg, "frontier"), results)
    print(f"frontier: {_out_dir(args, cfg, 'frontier') / 'frontier.html'}")
    return 0


def cmd_bench(args) -> int:
    from dpoflow_bench import CASES, CONTENDERS, SUITES
    from dpoflow_bench.suites import run_bench

    contenders = [name for name in args.contender or CONTENDERS if args.against == "trl" or not name.startswith("trl")]
    run_bench(steps=args.steps, batch=args.batch, cases=args.case or list(CASES), contenders=contenders,
              repeats=args.repeats, out=args.json, suites=args.suite or SUITES, precision=args.precision,
              model=args.model, shape=args.shape, layers=args.layers or None)
    return 0


def cmd_run(args) -> int:
    from dpoflow.pipeline.local import run_local

    run_local(load_config(args.config, args.overrides), runner=args.runner, image=args.image, storage=args.storage)
    return 0


def cmd_register(args) -> int:
    from dpoflow import tracking
    from dpoflow.registry import run_register

    cfg = load_config(args.config, args.overrides)
    paths = step_dirs(cfg)
    model = Path(args.model) if args.model else paths["dpo"] / "model"
    metrics_file = Path(args.metrics) if args.metrics else paths["eval"] / "metrics.json"
    if not metrics_file.exists():
        raise FileNotFoundError(f"{metrics_file} does not exist: run `dpoflow eval` first (or pass --metrics)")
    figures = json.loads(metrics_file.read_text())
    # a run to hold the logged model
    run_id = tracking.start_parent_run(cfg.tracking.experiment, f"register-{cfg.registry.model_name}")
    version = run_register(model, figures, {"beta": figures.get("beta"), "config_hash": config_hash(cfg)},
                           model_name=cfg.registry.model_name, run_id=run_id)
    tracking.end_run(run_id)
    print(f"register: models:/{cfg.registry.model_name}/{version} (alias candidate)")
    return 0


def cmd_promote(args) -> int:
    from dpoflow.registry import rollback, run_gate, run_promote

    cfg = load_config(args.config, args.overrides)
    name = cfg.registry.model_name
    if args.rollback:
        rollback(name)
        return 0
    if not args.version:
        raise ValueError("give --version N to promote (it must pass the gate) or --rollback")

    def gate() -> bool:
        return run_gate(name, args.version, min_win_rate=cfg.registry.min_win_rate,
                        min_diversity=cfg.registry.min_diversity, max_length_ratio=cfg.registry.max_length_ratio)

    if not args.force and not gate():
        print(f"promote: v{args.version} did not pass the gate; champion unchanged (--force overrides)")
        return 1
    return 0 if run_promote(name, args.version, regate=gate, force=args.force)["promoted"] else 1


def cmd_deploy(args) -> int:
    import yaml

    from dpoflow.deploy import run_deploy

    cfg = load_config(args.config, args.overrides)
    service = run_deploy(cfg.registry.model_name, alias=args.alias, version=args.version,
                         artifact_root=args.artifact_root, uri=args.storage_uri, name=args.name,
                         namespace=args.namespace, gpus=args.gpus, service_account=args.service_account or None,
                         max_model_len=args.max_model_len)
    text = yaml.safe_dump(service, sort_keys=False)
    if args.output:
        Path(args.output).write_text(text)
        print(f"deploy: {args.output}: InferenceService {service['metadata']['name']} serving "
              f"{cfg.registry.model_name} v{service['metadata']['annotations']['dpoflow/version']} from "
              f"{service['spec']['predictor']['model']['storageUri']} (kubectl apply -f {args.output})")
    else:
        sys.stdout.write(text)
    return 0


def cmd_compile(args) -> int:
    from dpoflow.pipeline.client import PIPELINE_FILE, compile_all, render_dag

    cfg = load_config(args.config, args.overrides)
    for path in compile_all(Path(args.root), image=args.image, config=cfg, storage=args.storage):
        print(f"compile: {path}")
    print(f"compile: {render_dag(Path(args.root) / PIPELINE_FILE, Path(args.root) / PIPELINE_FILE.with_suffix('.png'))}")
    return 0


def cmd_submit(args) -> int:
    from dpoflow.pipeline.client import parse_params, submit

    arguments = parse_params(args.param, Path(args.package))
    run_id = submit(args.host, arguments, experiment=args.experiment, run_name=args.run_name,
                    package=Path(args.package), token=args.token)
    print(f"submit: run {run_id} in experiment '{args.experiment}' at {args.host}")
    return 0


def cmd_schedule(args) -> int:
    from dpoflow.pipeline.client import parse_params, schedule, validate_cron

    validate_cron(args.cron)
    arguments = parse_params(args.param, Path(args.package))
    recurring = schedule(args.host, args.cron, arguments, experiment=args.experiment, job_name=args.name,
                         max_concurrency=args.max_concurrency, no_catchup=args.no_catchup,
                         package=Path(args.package), token=args.token)
    print(f"schedule: recurring run {recurring} ('{args.cron}') in experiment '{args.experiment}' at {args.host}")
    return 0


def cmd_runs(args) -> int:
    from dpoflow.runs import compare_runs, runs_table

    cfg = load_config(args.config, args.overrides)
    if args.compare:
        print(compare_runs(args.compare[0], args.compare[1], cfg.tracking.experiment))
    else:
        print(runs_table(cfg.tracking.experiment, sort=args.sort, limit=args.limit))
    return 0
