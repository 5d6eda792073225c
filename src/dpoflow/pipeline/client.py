"""Compile, submit and schedule the pipeline on a Kubeflow Pipelines server (kfp.Client).

    dpoflow compile                       pipelines/dpo_alignment.yaml + components/<step>.yaml
    dpoflow submit --host URL [--param k=v]...
    dpoflow schedule --host URL --cron '0 0 3 * * *'

Authentication is kfp.Client's: a token from `KF_PIPELINES_TOKEN` (or `--token`), the in-cluster
service-account token, or the kube config's credentials.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

PIPELINE_FILE = Path("pipelines/dpo_alignment.yaml")
COMPONENTS_DIR = Path("components")


def compile_all(root: Path = Path("."), image: str | None = None, config=None, storage: str = "shared") -> list[Path]:
    """Write the pipeline and one spec per component under `root`; return the files written.
    `storage`: shared (step outputs on the dpoflow-workspace volume) or artifacts (dag.py)."""
    from kfp import compiler

    from dpoflow.pipeline.components import DEFAULT_IMAGE, build_components
    from dpoflow.pipeline.dag import build_pipeline

    image = image or DEFAULT_IMAGE
    written = []
    pipeline_file = root / PIPELINE_FILE
    pipeline_file.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(image, config, storage=storage), str(pipeline_file))
    written.append(pipeline_file)
    (root / COMPONENTS_DIR).mkdir(parents=True, exist_ok=True)
    for name, component in build_components(image).items():
        path = root / COMPONENTS_DIR / f"{name}.yaml"
        compiler.Compiler().compile(component, str(path))
        written.append(path)
    # the ClusterTrainingRuntime multi-node DPO runs on (cluster-scoped: a cluster admin applies it)
    from dpoflow.trainjob import RUNTIME_FILE, runtime_manifest

    runtime = root / RUNTIME_FILE
    runtime.parent.mkdir(parents=True, exist_ok=True)
    runtime.write_text("# Written by `dpoflow compile` (src/dpoflow/trainjob.py): the Kubeflow Trainer runtime of "
                       "multi-node DPO.\n# Apply once per cluster: kubectl apply -f " + RUNTIME_FILE + "\n"
                       + yaml.safe_dump(runtime_manifest(image), sort_keys=False))
    written.append(runtime)
    from dpoflow.redact import redact

    for path in written:  # the config refuses credentials; this catches anything else secret-shaped
        path.write_text(redact(path.read_text()))
    return written


def pipeline_parameters(package: Path = PIPELINE_FILE) -> dict[str, dict]:
    """The compiled pipeline's parameters: name -> {parameterType, defaultValue, ...}."""
    spec = next(yaml.safe_load_all(Path(package).read_text()))
    return spec["root"]["inputDefinitions"]["parameters"]


def parse_params(pairs: list[str], package: Path = PIPELINE_FILE) -> dict:
    """`k=v` strings -> typed arguments; an unknown name fails before any request is made."""
    known = pipeline_parameters(package)
    arguments = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--param {pair!r} is not of the form name=value")
        name, text = pair.split("=", 1)
        if name not in known:
            raise ValueError(f"--param {name}: the pipeline has no such parameter; known: {', '.join(sorted(known))}")
        kind = known[name]["parameterType"]
        value = text if kind == "STRING" else _parse(text)
        expected = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": (int, float), "BOOLEAN": bool, "LIST": list,
                    "STRUCT": dict}.get(kind)
        if expected is not None and (not isinstance(value, expected) or (kind == "NUMBER_INTEGER" and isinstance(value, bool))):
            raise ValueError(f"--param {name}={text}: expected {kind.lower().replace('_', ' ')}")
        arguments[name] = float(value) if kind == "NUMBER_DOUBLE" else value
    return arguments


def _parse(text: str):
    """JSON first (YAML 1.1 reads `1e-5` as a string), else YAML (`[0.1, 0.3]`, `true`)."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.safe_load(text)


def validate_cron(expression: str) -> str:
    """KFP's scheduler takes 6 fields, seconds first (robfig/cron): '0 0 3 * * *' is daily at 03:00.
    A 5-field (crontab) expression would be read shifted by one field, so it is refused."""
    fields = expression.split()
    if len(fields) == 5:
        raise ValueError(f"cron {expression!r} has 5 fields; Kubeflow Pipelines uses 6, seconds first: "
                         f"'0 {expression}' runs at the same times (e.g. '0 0 3 * * *' = daily 03:00)")
    if len(fields) != 6:
        raise ValueError(f"cron {expression!r} must have 6 fields (seconds minutes hours day-of-month month "
                         "day-of-week), e.g. '0 0 3 * * *' = daily 03:00")
    return expression


def _client(host: str, token: str | None = None):
    import kfp

    return kfp.Client(host=host, existing_token=token or os.environ.get("KF_PIPELINES_TOKEN") or None)


def _experiment_id(client, name: str) -> str:
    try:
        return client.get_experiment(experiment_name=name).experiment_id
    except Exception:
        return client.create_experiment(name).experiment_id


def submit(host: str, arguments: dict, *, experiment: str = "dpoflow", run_name: str | None = None,
           package: Path = PIPELINE_FILE, token: str | None = None) -> str:
    """Start one run of the compiled pipeline; returns the run id."""
    client = _client(host, token)
    result = client.create_run_from_pipeline_package(str(package), arguments=arguments, run_name=run_name,
                                                     experiment_name=experiment)
    return result.run_id


def schedule(host: str, cron: str, arguments: dict, *, experiment: str = "dpoflow", job_name: str = "dpoflow-retrain",
             max_concurrency: int = 1, no_catchup: bool = True, package: Path = PIPELINE_FILE,
             token: str | None = None) -> str:
    """Upload the pipeline (a new version when it exists) and create a recurring run on it; returns its id."""
    validate_cron(cron)
    client = _client(host, token)
    experiment_id = _experiment_id(client, experiment)
    from dpoflow import __version__
    from dpoflow.pipeline.dag import PIPELINE_NAME

    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=PIPELINE_NAME).pipeline_id
    version = client.upload_pipeline_version(str(package), f"{__version__}-{int(time.time())}", pipeline_id=pipeline_id)
    recurring = client.create_recurring_run(experiment_id, job_name, cron_expression=cron,
                                            max_concurrency=max_concurrency, no_catchup=no_catchup, params=arguments,
                                            pipeline_id=pipeline_id, version_id=version.pipeline_version_id)
    return recurring.recurring_run_id


def render_dag(package: Path = PIPELINE_FILE, png: Path = Path("pipelines/dpo_alignment.png")) -> Path:
    """A picture of the compiled DAG (what the Kubeflow UI draws), for the README: tasks by dependency
    depth; a ParallelFor or an If is drawn as a box holding its own tasks, a sub-pipeline's tasks in
    line with the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = next(yaml.safe_load_all(Path(package).read_text()))

    def depths(tasks: dict) -> dict[str, int]:
        found: dict[str, int] = {}

        def depth(name):
            if name not in found:
                found[name] = 1 + max((depth(d) for d in tasks[name].get("dependentTasks", []) if d in tasks), default=-1)
            return found[name]

        for name in tasks:
            depth(name)
        return found

    def inline(tasks: dict) -> dict:
        """A sub-pipeline's tasks in place of its task (its first tasks depend on what it depended on)."""
        out = {}
        for name, task in tasks.items():
            inner = spec["components"][task["componentRef"]["name"]].get("dag", {}).get("tasks")
            if inner is None or "parameterIterator" in task or "triggerPolicy" in task:
                out[name] = task
                continue
            for inner_name, inner_task in inline(inner).items():
                out[inner_name] = {**inner_task, "dependentTasks": inner_task.get("dependentTasks")
                                   or task.get("dependentTasks", [])}
        return out

    def label(name: str, task: dict) -> tuple[str, list[str]]:
        component = task["componentRef"]["name"]
        inner = spec["components"][component].get("dag", {}).get("tasks")
        if inner is None:
            return name, []
        order = sorted(inner, key=lambda t: depths(inner)[t])
        title = "ParallelFor β in betas" if "parameterIterator" in task else f"If {name}: gate == 'pass'"
        return title, order

    tasks = inline(spec["root"]["dag"]["tasks"])
    levels = depths(tasks)
    fig, axis = plt.subplots(figsize=(7, 0.9 * (max(levels.values()) + 1) + 0.6))
    axis.set_axis_off()
    positions = {}
    for name, level in sorted(levels.items(), key=lambda item: item[1]):
        title, inner = label(name, tasks[name])
        y = -level
        positions[name] = y
        if inner:
            axis.add_patch(plt.Rectangle((0.05, y - 0.38), 0.9, 0.76, fill=False, linestyle="--", color="#555"))
            axis.text(0.07, y + 0.27, title, fontsize=8, color="#555", va="center")
            for i, task in enumerate(inner):
                x = 0.5 + (i - (len(inner) - 1) / 2) * 0.28
                axis.text(x, y - 0.05, task, ha="center", va="center", fontsize=9,
                          bbox=dict(boxstyle="round", fc="#dbe9f6", ec="#3d6fa8"))
                if i:
                    axis.annotate("", (x - 0.1, y - 0.05), (x - 0.18, y - 0.05), arrowprops=dict(arrowstyle="->"))
        else:
            axis.text(0.5, y, name, ha="center", va="center", fontsize=10,
                      bbox=dict(boxstyle="round", fc="#e8f3e0", ec="#4b8a2e"))
    for name, task in tasks.items():
        for parent in task.get("dependentTasks", []):
            if parent in positions and positions[parent] == positions[name] + 1:
                axis.annotate("", (0.5, positions[name] + 0.4), (0.5, positions[parent] - 0.4),
                              arrowprops=dict(arrowstyle="->", color="#333"))
    axis.set_xlim(0, 1)
    axis.set_ylim(min(positions.values()) - 0.6, 0.6)
    axis.set_title(f"{spec['pipelineInfo']['name']} (compiled: {Path(package).name})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
