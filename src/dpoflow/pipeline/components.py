"""The KFP components: one typed shell per step. Each body imports dpoflow and calls one function of
`dpoflow.pipeline.tasks` with explicit arguments — the logic lives there, not here.

The functions below are plain Python; `build_components(image)` turns them into lightweight
components whose `base_image` is the dpoflow image (a compile-time setting, default tag = the package
version) with `install_kfp_package=False`: pods install nothing at start. kfp copies each function's
source into the component, so imports stay inside the bodies.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from dpoflow.image import DEFAULT_IMAGE


def fingerprint(config: str, config_overrides: str, base_model: str, data_kind: str, data_source: str,
                dvc_repo: str, dvc_path: str, dvc_rev: str, betas: list, loss_type: str, learning_rate: float,
                max_steps: int, judge: str, min_win_rate: float, model_name: str, dpo_nodes: int, workspace: str,
                mlflow_uri: str, mlflow_run_id: str, compiled_rounds: int) -> NamedTuple(
                    "FingerprintOutputs", [("config", str), ("data_md5", str), ("parent_run_id", str)]):
    """Resolve the run config from the parameters (a wrong key fails here, naming it) — the `config`
    every later task takes —, fingerprint the data (its md5 is what makes the cached steps re-run on
    new data) and open the MLflow parent run."""
    from collections import namedtuple

    from dpoflow.pipeline.tasks import FINGERPRINT_OUTPUTS, fingerprint_task

    flat = dict(base_model=base_model, data_kind=data_kind, data_source=data_source, betas=betas,
                loss_type=loss_type, learning_rate=learning_rate, max_steps=max_steps, judge=judge,
                min_win_rate=min_win_rate, model_name=model_name, dpo_nodes=dpo_nodes)
    out = fingerprint_task(config=config, flat=flat, config_overrides=config_overrides,
                           dvc=(dvc_repo, dvc_path, dvc_rev), workspace=workspace, mlflow_uri=mlflow_uri,
                           mlflow_run_id=mlflow_run_id, compiled_rounds=compiled_rounds)
    return namedtuple("FingerprintOutputs", FINGERPRINT_OUTPUTS)(*(out[name] for name in FINGERPRINT_OUTPUTS))


def data(config: str, data_md5: str, workspace: str, dataset: Output[Dataset]):
    """Load, validate (bad rows quarantined with a reason) and split the data; rows, md5 and rev in
    the dataset's metadata."""
    from dpoflow.pipeline.tasks import data_task

    data_task(config=config, data_md5=data_md5, workspace=workspace, dataset=dataset)


def sft(config: str, data: Input[Dataset], workspace: str, reference_model: Output[Model]):
    """Fine-tune the base on the SFT corpus: the result is the frozen reference (or pass the given
    base through when sft.enabled is false)."""
    from dpoflow.pipeline.tasks import sft_task

    sft_task(config=config, data=data, workspace=workspace, reference_model=reference_model)


def prefs(config: str, data: Input[Dataset], reference_model: Input[Model], workspace: str, pairs: Output[Dataset]):
    """Sample the reference (or model.policy_init) k times per prompt, judge, keep best vs worst as
    pairs (or the data's own pairs); with on-policy rounds, round 1's share of the prompts."""
    from dpoflow.pipeline.tasks import prefs_task

    prefs_task(config=config, data=data, reference_model=reference_model, workspace=workspace, pairs=pairs)


def reference(config: str, pairs: Input[Dataset], reference_model: Input[Model], workspace: str,
              reference_logps: Output[Dataset]):
    """The reference's log-probs over every pair, computed once for the whole β sweep (cache key in metadata)."""
    from dpoflow.pipeline.tasks import reference_task

    reference_task(config=config, pairs=pairs, reference_model=reference_model, workspace=workspace,
                   reference=reference_logps)


def round_prefs(config: str, beta: float, round: int, data: Input[Dataset], sampler: Input[Model],
                previous_results: Input[Artifact], threads: int, workspace: str, pairs: Output[Dataset]):
    """On-policy round r: pairs sampled from round r-1's policy on this round's share of the prompts,
    judged as in prefs; stops when round r-1's samples lost their diversity (run.min_diversity)."""
    from dpoflow.pipeline.tasks import round_prefs_task

    round_prefs_task(config=config, beta=beta, round=round, data=data, sampler=sampler,
                     previous_results=previous_results, workspace=workspace, threads=threads, pairs=pairs)


def round_reference(config: str, beta: float, round: int, pairs: Input[Dataset], reference_model: Input[Model],
                    threads: int, workspace: str, reference_logps: Output[Dataset]):
    """The reference's log-probs over round r's pairs (the fixed reference, or round r-1's policy)."""
    from dpoflow.pipeline.tasks import round_reference_task

    round_reference_task(config=config, beta=beta, round=round, pairs=pairs, reference_model=reference_model,
                         workspace=workspace, threads=threads, reference=reference_logps)


def dpo(config: str, parent_run_id: str, beta: float, round: int, pairs: Input[Dataset], reference_model: Input[Model],
        reference_logps: Input[Dataset], init_policy: Input[Model], data: Input[Dataset], gpus: int, gpu_type: str,
        threads: int, workspace: str, mlflow_uri: str, policy: Output[Model]):
    """Train the policy with DPO at this β from `init_policy` (accelerate; DDP over `gpus` GPUs of type
    `gpu_type` in this pod). Its training metrics reach MLflow while it runs; the β run's id is in the
    policy's metadata."""
    from dpoflow.pipeline.tasks import dpo_task

    # gpu_type is an input so that KFP passes the parameter into the loop (it sets the accelerator)
    policy.metadata["accelerator"] = f"{gpus} x {gpu_type}" if gpus else "cpu"
    dpo_task(config=config, parent_run_id=parent_run_id, beta=beta, round=round, pairs=pairs,
             reference_model=reference_model, reference=reference_logps, init_policy=init_policy, data=data, gpus=gpus,
             threads=threads, workspace=workspace, mlflow_uri=mlflow_uri, policy=policy)


def evaluate(config: str, beta: float, round: int, policy: Input[Model], reference_model: Input[Model],
             data: Input[Dataset], pairs: Input[Dataset], threads: int, workspace: str, mlflow_uri: str,
             results: Output[Artifact], metrics: Output[Metrics], report: Output[HTML]):
    """Win rate vs the reference with its 95 % interval, reward margin, KL; the report renders in the UI."""
    from dpoflow.pipeline.tasks import eval_task

    eval_task(config=config, beta=beta, round=round, policy=policy, reference_model=reference_model, data=data,
              pairs=pairs, threads=threads, workspace=workspace, mlflow_uri=mlflow_uri, results=results,
              metrics=metrics, report=report)


def register(config: str, parent_run_id: str, policy: Input[Model], results: Input[Artifact], data: Input[Dataset],
             reference_logps: Input[Dataset], mlflow_uri: str) -> str:
    """Register the policy in MLflow (alias `candidate`) with lineage and quality tags; returns the version."""
    from dpoflow.pipeline.registry_tasks import register_task

    return register_task(config=config, parent_run_id=parent_run_id, policy=policy, results=results, data=data,
                         reference=reference_logps, mlflow_uri=mlflow_uri)


def select(config: str, versions: list, parent_run_id: str, mlflow_uri: str) -> str:
    """The sweep's best version: highest win-rate interval lower bound within registry.max_kl, ties to lower KL."""
    from dpoflow.pipeline.registry_tasks import select_task

    return select_task(config=config, versions=versions, parent_run_id=parent_run_id, mlflow_uri=mlflow_uri)


def gate(config: str, version: str, data: Input[Dataset], mlflow_uri: str) -> str:
    """'pass' when the selected version may become champion (win rate, interval, not worse than the champion)."""
    from dpoflow.pipeline.registry_tasks import gate_task

    return gate_task(config=config, version=version, data=data, mlflow_uri=mlflow_uri)


def promote(config: str, version: str, data: Input[Dataset], mlflow_uri: str) -> str:
    """Alias `champion` -> the version if `champion` is still the one the gate compared against (else
    the version is gated again against the new one); the former champion keeps `previous-champion`."""
    from dpoflow.pipeline.registry_tasks import promote_task

    return promote_task(config=config, version=version, data=data, mlflow_uri=mlflow_uri)


def multinode_dpo(beta: float, dpo_cfg: str, image: str, nodes: int, gpus_per_node: int, pvc_name: str,
                  pairs_path: str, reference_model_path: str, reference_path: str, output_path: str,
                  engine: str, namespace: str, secret_name: str, timeout_s: int) -> str:
    """Multi-node DPO: create a Kubeflow Trainer v2 TrainJob (engine='trainjob') or a Training Operator
    PyTorchJob (engine='pytorchjob') running `dpoflow dpo` under torchrun on nodes x GPUs, with the
    pairs, reference cache and output on a shared ReadWriteMany PVC; wait, stream logs, fail with the job."""
    from dpoflow.pipeline.multinode import JobSpec, launch

    spec = JobSpec(beta=beta, dpo_config=dpo_cfg, image=image, nodes=nodes, gpus_per_node=gpus_per_node,
                   pvc_name=pvc_name, pairs_path=pairs_path, reference_model_path=reference_model_path,
                   reference_path=reference_path, output_path=output_path, namespace=namespace,
                   secret_name=secret_name)
    return launch(spec, engine=engine, timeout_s=timeout_s)


STEPS = (fingerprint, data, sft, prefs, reference, round_prefs, round_reference, dpo, evaluate, register, select, gate,
         promote, multinode_dpo)


def build_components(image: str = DEFAULT_IMAGE) -> dict:
    """name -> KFP component for every step, all on `image`."""
    return {fn.__name__: dsl.component(fn, base_image=image, install_kfp_package=False) for fn in STEPS}
