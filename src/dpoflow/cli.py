"""`dpoflow` command line: one subcommand per step, each a thin call of the step function.

Conventions shared by every step command: `-c/--config` (default params.yaml), repeatable
`--set key.path=value`, `--out DIR` (default <run.output_dir>/<run.name>/<step>).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dpoflow.config import ConfigError, config_dict, config_hash, load_config
from dpoflow.image import DEFAULT_IMAGE
from dpoflow.layout import STORAGE, beta_threads, set_threads, step_dirs
from dpoflow.redact import redact
from dpoflow.training import TrainingError


def _add_common(parser: argparse.ArgumentParser, out: bool = True) -> None:
    parser.add_argument("-c", "--config", default="params.yaml", help="run config (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.mode=quarantine (repeatable)")
    if out:
        parser.add_argument("--out", default=None, help="output folder (default: <output_dir>/<run name>/<step>)")


def _add_launch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-processes", type=int, default=1, help="data-parallel processes (gloo on CPU)")
    parser.add_argument("--accelerate-config", help="accelerate config file (FSDP, DeepSpeed, multi-node); "
                        "see configs/accelerate/")


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
    from dpoflow.bench import CASES, CONTENDERS, SUITES, run_bench

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpoflow", description="Reproducible DPO alignment pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the whole pipeline from the config (the default demo: make run)")
    _add_common(run, out=False)
    run.add_argument("--runner", choices=["process", "container"], default="process",
                     help="process: tasks as subprocesses of this environment (default); container: every task in "
                          "its own container of --image, as a cluster runs them (needs podman or docker)")
    run.add_argument("--image", help="the image of --runner container, and of the TrainJob nodes with dpo.nodes > 1 "
                                     "(default dpoflow/dpoflow:<version>; build it with `make image`)")
    run.add_argument("--storage", choices=STORAGE, default="shared",
                     help="--runner container: shared (default, as on a cluster): the run folder is mounted into "
                          "every task and only pointers to the step outputs travel as artifacts; artifacts: every "
                          "output is copied through the pipeline root (a cluster without a ReadWriteMany volume)")
    run.set_defaults(func=cmd_run)

    sft = sub.add_parser("sft", help="fine-tune the base on the SFT corpus; the result is the reference")
    _add_common(sft)
    sft.add_argument("--data", help="output folder of `dpoflow data` (an SFT corpus)")
    sft.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    _add_launch(sft)
    sft.set_defaults(func=cmd_sft)

    prefs = sub.add_parser("prefs", help="sample the reference k times per prompt and build judged pairs")
    _add_common(prefs)
    prefs.add_argument("--data", help="output folder of `dpoflow data` (with prompts_*.parquet)")
    prefs.add_argument("--model", help="reference model folder")
    prefs.set_defaults(func=cmd_prefs)

    reference = sub.add_parser("reference", help="compute the reference model's log-probs over all pairs once")
    _add_common(reference)
    reference.add_argument("--pairs", help="folder with train/eval.parquet pairs")
    reference.add_argument("--model", help="reference model folder")
    reference.add_argument("--cache-dir", help="content-addressed cache shared across runs")
    reference.set_defaults(func=cmd_reference)

    dpo = sub.add_parser("dpo", help="train the policy with DPO on accelerate")
    _add_common(dpo)
    dpo.add_argument("--pairs", help="folder with train.parquet pairs")
    dpo.add_argument("--reference-model", help="reference model folder (also the policy's init unless --init-model)")
    dpo.add_argument("--init-model", help="policy to start from (default: model.policy_init, else the reference)")
    dpo.add_argument("--reference-dir", help="output of `dpoflow reference` (dpo.reference=cached)")
    dpo.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    _add_launch(dpo)
    dpo.add_argument("--nodes", type=int, help="run as a Kubeflow Trainer TrainJob over N nodes (sets dpo.nodes): "
                     "here one container of --image per node, --num-processes per node")
    dpo.add_argument("--image", default=DEFAULT_IMAGE, help="the nodes' image (dpo.nodes > 1)")
    dpo.add_argument("--shared", help="the folder every node mounts as /workspace (dpo.nodes > 1; default: the run's "
                     "folder, <output_dir>/<run name>): every input and --out must be under it")
    dpo.set_defaults(func=cmd_dpo)

    evaluation = sub.add_parser("eval", help="win rate of the policy vs the reference, reward margin, KL, report")
    _add_common(evaluation)
    evaluation.add_argument("--policy", help="policy model folder (default: the dpo output for dpo.beta)")
    evaluation.add_argument("--reference-model", help="reference model folder")
    evaluation.add_argument("--data", help="output of `dpoflow data` (prompts_eval.parquet)")
    evaluation.add_argument("--pairs", help="held-out preference pairs (eval.parquet) for implicit-reward accuracy")
    evaluation.set_defaults(func=cmd_eval)

    frontier = sub.add_parser("frontier", help="reward vs KL of the β sweep (frontier.json + frontier.html)",
                              description="Collect every β's evaluation into the reward-vs-KL frontier page "
                              "(the miniature of the DPO paper's Figure 2).")
    _add_common(frontier)
    frontier.set_defaults(func=cmd_frontier)

    from dpoflow.bench import CASES, CONTENDERS, SCALING_MODELS, SUITES  # stdlib-only at import: cheap for the parser
    from dpoflow.bench_vocab import SHAPES

    bench = sub.add_parser("bench", help="throughput: DPO vs TRL DPOTrainer, SFT vs SFTTrainer, generation")
    bench.add_argument("--against", choices=["trl", "none"], default="trl",
                       help="time TRL's DPOTrainer (live and precomputed reference) too (default)")
    bench.add_argument("--steps", type=int, default=5, help="timed steps per contender (after 1 warm-up)")
    bench.add_argument("--batch", type=int, default=8, help="pairs per step")
    bench.add_argument("--case", action="append", choices=list(CASES),
                       help="repeatable; default: all three")
    bench.add_argument("--contender", action="append", choices=list(CONTENDERS), help="repeatable; default: all")
    bench.add_argument("--suite", action="append", choices=[*SUITES, "scaling", "vocab"],
                       help="repeatable; default: dpo, sft, generate (dpo: the DPO cases; sft: vs SFTTrainer; "
                       "generate: sampling; scaling: length 256-2048 and model 17M-120M; vocab: a real model shape "
                       "at vocabularies 2k-152k, reference/DPO/SFT/sampling, and what fits; table + plot in bench/)")
    bench.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-0.5b",
                       help="the vocab suite's model shape (random weights)")
    bench.add_argument("--layers", type=int, default=2,
                       help="the vocab suite's body cut to this many layers (0 = the whole model, on a GPU)")
    bench.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="both sides (bf16: on a GPU)")
    bench.add_argument("--model", choices=list(SCALING_MODELS), help="DPO cases on this size instead of the 14.5M one")
    bench.add_argument("--repeats", type=int, default=2, help="alternated runs per contender (the best is kept)")
    bench.add_argument("--json", help="write the results as JSON here")
    bench.set_defaults(func=cmd_bench)

    register = sub.add_parser("register", help="register a trained policy in MLflow (alias candidate)",
                              description="Log the policy (safetensors + tokenizer) and register it under "
                              "registry.model_name with lineage and quality tags; alias candidate.")
    _add_common(register, out=False)
    register.add_argument("--model", help="policy folder (default: the dpo output for dpo.beta)")
    register.add_argument("--metrics", help="its eval metrics.json (default: the eval output for dpo.beta)")
    register.set_defaults(func=cmd_register)

    promote = sub.add_parser("promote", help="make a version champion through the gate, or roll back",
                             description="Alias champion -> --version when it passes the gate (win rate, "
                             "interval, not worse than the champion); the old champion keeps previous-champion.")
    _add_common(promote, out=False)
    promote.add_argument("--version", help="registered version to promote")
    promote.add_argument("--rollback", action="store_true", help="swap champion and previous-champion")
    promote.add_argument("--force", action="store_true", help="promote without the gate")
    promote.set_defaults(func=cmd_promote)

    deploy = sub.add_parser("deploy", help="a KServe InferenceService for a registered version (the champion)",
                            description="Render the InferenceService (serving.kserve.io/v1beta1, Hugging Face "
                            "runtime) that serves models:/<registry.model_name>@<alias>, pinned to the version the "
                            "alias points at now; apply it with kubectl apply -f.")
    _add_common(deploy, out=False)
    deploy.add_argument("--alias", default="champion", help="registry alias to serve (default: champion)")
    deploy.add_argument("--version", help="serve this version instead of an alias")
    deploy.add_argument("--artifact-root", help="the store behind the MLflow server's artifact proxy (its "
                        "--artifacts-destination, e.g. s3://mlflow/artifacts): maps mlflow-artifacts:/ URIs")
    deploy.add_argument("--storage-uri", help="read the weights from here instead of the version's artifacts")
    deploy.add_argument("--name", help="InferenceService name (default: from registry.model_name)")
    deploy.add_argument("--namespace", help="namespace (default: kubectl's)")
    deploy.add_argument("--gpus", type=int, default=1, help="GPUs for the predictor (0: CPU, Hugging Face backend)")
    deploy.add_argument("--max-model-len", type=int, help="vLLM's longest sequence (default: the model's)")
    deploy.add_argument("--service-account", default="dpoflow-serving",
                        help="service account holding the object store's credentials ('' for none)")
    deploy.add_argument("-o", "--output", help="write the YAML here (default: stdout)")
    deploy.set_defaults(func=cmd_deploy)

    compile_ = sub.add_parser("compile", help="write pipelines/dpo_alignment.yaml and components/*.yaml",
                              description="Compile the KFP pipeline (upload it in the Kubeflow UI) and every "
                              "component; parameter defaults come from the config.")
    _add_common(compile_, out=False)
    compile_.add_argument("--image", help="image of every step (default: the dpoflow image of this version)")
    compile_.add_argument("--root", default=".", help="project folder to write pipelines/ and components/ in")
    compile_.add_argument("--storage", choices=STORAGE, default="shared",
                          help="shared (default): every task mounts the ReadWriteMany volume dpoflow-workspace and "
                               "step outputs stay on it (no model copied between tasks); artifacts: no volume, "
                               "every output through the artifact store")
    compile_.set_defaults(func=cmd_compile)

    for name, text in (("submit", "start one run of the compiled pipeline on a Kubeflow Pipelines server"),
                       ("schedule", "create a recurring run (retraining) on a Kubeflow Pipelines server")):
        cluster = sub.add_parser(name, help=text, description=text + "; the token comes from --token, "
                                 "KF_PIPELINES_TOKEN, the in-cluster service account or the kube config.")
        cluster.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
        cluster.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                             help="pipeline parameter (repeatable), e.g. --param betas='[0.1,0.3]'")
        cluster.add_argument("--experiment", default="dpoflow", help="KFP experiment")
        cluster.add_argument("--package", default="pipelines/dpo_alignment.yaml", help="compiled pipeline")
        cluster.add_argument("--token", help="bearer token (default: KF_PIPELINES_TOKEN)")
        if name == "submit":
            cluster.add_argument("--run-name", help="run name shown in the UI")
            cluster.set_defaults(func=cmd_submit)
        else:
            cluster.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 3 * * *' = daily 03:00")
            cluster.add_argument("--name", default="dpoflow-retrain", help="recurring run name")
            cluster.add_argument("--max-concurrency", type=int, default=1, help="runs allowed at once")
            cluster.add_argument("--no-catchup", action=argparse.BooleanOptionalAction, default=True,
                                 help="skip runs missed while paused (default: skip)")
            cluster.set_defaults(func=cmd_schedule)

    runs = sub.add_parser("runs", help="recent MLflow runs: key params vs key metrics, or compare two",
                          description="A table of the experiment's runs (β, loss, lr, steps, data md5 vs win rate, "
                          "KL, margin), sortable by a metric; `--compare A B` shows config and metric differences.")
    _add_common(runs, out=False)
    runs.add_argument("--sort", default="eval/win_rate", help="metric to sort by (descending)")
    runs.add_argument("--limit", type=int, default=20, help="rows shown")
    runs.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="two run ids")
    runs.set_defaults(func=cmd_runs)

    config = sub.add_parser("config", help="show the resolved config and its hash")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved config and its stable hash")
    _add_common(show, out=False)
    show.set_defaults(func=cmd_config_show)

    data = sub.add_parser("data", help="load, validate, split and fingerprint a dataset")
    _add_common(data)
    data.add_argument("--source", help="a .jsonl/.parquet/.csv file or save_to_disk folder (overrides data.source)")
    data.add_argument("--mode", choices=["strict", "quarantine"], help="what to do with bad rows")
    data.set_defaults(func=cmd_data)
    for action in sub._choices_actions:  # every --help page opens with what the command does
        command = sub.choices[action.dest]
        command.description = command.description or action.help[0].upper() + action.help[1:] + "."
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"dpoflow: {redact(str(error))}", file=sys.stderr)
        return 2
    except TrainingError as error:  # stopped on purpose: a non-finite loss, or SIGTERM (checkpoint saved)
        print(f"dpoflow {args.command}: {error}", file=sys.stderr)
        return 143 if "SIGTERM" in str(error) else 1
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"dpoflow {args.command}: error: {redact(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        terminated = type(stop).__name__ == "Terminated"
        kept = ("its containers are stopped and removed, the services it started stopped; a new run starts over"
                if getattr(args, "runner", "process") == "container" else "finished steps are kept and reused, and "
                "training resumes from its last checkpoint, when you start it again")
        print(f"\ndpoflow {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}; {kept}",
              file=sys.stderr)
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
