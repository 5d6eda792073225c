"""`dpoflow` command line: the subcommands and their arguments (commands.py: what each one does), one
per step, each a thin call of the step function, and the pipeline, registry, serving and bench ones.

Conventions shared by every step command: `-c/--config` (default params.yaml), repeatable
`--set key.path=value`, `--out DIR` (default <run.output_dir>/<run.name>/<step>).
"""

from __future__ import annotations

import argparse
import sys

from dpoflow.commands import (
    cmd_bench,
    cmd_compile,
    cmd_config_show,
    cmd_data,
    cmd_deploy,
    cmd_dpo,
    cmd_eval,
    cmd_frontier,
    cmd_prefs,
    cmd_promote,
    cmd_reference,
    cmd_register,
    cmd_run,
    cmd_runs,
    cmd_schedule,
    cmd_sft,
    cmd_submit,
)
from dpoflow.config import ConfigError
from dpoflow.image import DEFAULT_IMAGE
from dpoflow.layout import STORAGE
from dpoflow.redact import redact
from dpoflow.training import TrainingError


class _Parser(argparse.ArgumentParser):
    """No abbreviated options (`--runner` is not `--runner-kind`): a renamed flag fails where it is
    still used, and a new flag never makes an old abbreviation ambiguous. Subcommands inherit it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpoflow", description="Reproducible DPO alignment pipeline.")
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

    from dpoflow_bench import CASES, CONTENDERS, SCALING_MODELS, SHAPES, SUITES  # stdlib only: cheap for the parser

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
