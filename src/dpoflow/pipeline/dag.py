"""The one DAG, run by the Kubeflow cluster and by `dpoflow run` (kfp local runner) alike:

    fingerprint ──► data ──► sft ──► prefs ──► reference
                                                   │
    candidates (a sub-pipeline):
        ParallelFor(β in betas): dpo ──► evaluate ──► register (alias candidate)
        select (dsl.Collected versions) ──► gate ──► If(gate == 'pass'): promote (alias champion)

With run.rounds = R > 1 (on-policy rounds, unrolled when the pipeline is built), each β iteration is

    dpo(round 1) ──► evaluate ──► [round_prefs ──► round_reference ──► dpo ──► evaluate] x (R-1) ──► register

where round r samples its pairs from round r-1's policy and trains on from it.

`build_pipeline(image, config)` returns the pipeline function; parameter defaults come from the
config (params.yaml), so the compiled pipeline *is* the demo until a UI user changes a parameter.

Storage (`storage`, a compile-time choice because it decides what every pod mounts):
- "shared" (the default): every task mounts the ReadWriteMany volume `dpoflow-workspace` at
  /workspace; step outputs live in `workspace` (default /workspace/<run name>) and the artifacts
  between tasks are pointers to them. A 7B bf16 model (~15 GB) is written once per step that makes
  it and never copied between tasks; with artifacts a 3-β run moves ~33 model copies (~500 GB)
  through the object store. Needs a RWX storage class (NFS, CephFS, EFS, Filestore...).
- "artifacts": nothing mounted; every output is uploaded and every input downloaded by KFP (any
  cluster; fine for small models).
"""

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Input, Model

from dpoflow.config import Config
from dpoflow.layout import STORAGE
from dpoflow.pipeline.components import DEFAULT_IMAGE, build_components
from dpoflow.pipeline.parameters import pipeline_arguments
from dpoflow.trainjob import PVC, WORKSPACE

PIPELINE_NAME = "dpo-alignment"

# Secrets (their names are pipeline parameters): data key -> environment variable in the task pods.
MLFLOW_SECRET_KEYS = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                      "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
                  "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"}


def build_pipeline(image: str = DEFAULT_IMAGE, config: Config | None = None, parallelism: int = 0, retries: int = 2,
                   storage: str = "shared"):
    """The pipeline function for `image`; `config` gives the parameters' defaults (default: Config()).
    `retries`: per task that talks to services (a cluster's MLflow); the local runner uses 0.
    `storage`: where step outputs live (module doc).

    The config reaches every task one way: the fingerprint task resolves it once (params.yaml's
    values, the flat parameters, config_overrides) into the string `config` each task takes. The β
    sweep and the registry's tasks form the sub-pipeline `candidates`, which takes `config` as its
    own input: kfp 2.17's local runner replaces a task output that enters a ParallelFor directly by
    the loop item, an input of the enclosing pipeline it passes on unchanged."""
    if storage not in STORAGE:
        raise ValueError(f"storage {storage!r}: choose one of {', '.join(STORAGE)}")
    c = build_components(image)
    config = config or Config()
    rounds, reference_update = config.run.rounds, config.dpo.reference_update
    defaults = pipeline_arguments(config)

    def configure(task, *, tracked: bool, cached: bool, mlflow_secret, s3_secret) -> None:
        """What every task gets: its image's name (the lineage a registered version records), the
        volume of shared storage; tasks that talk to MLflow retry (a tracking server restart must not
        fail the run) and get its secrets. `cached`: KFP's cache may serve the task (never under
        shared storage: reuse is the step key's alone — reuse.py: the code the step runs, its
        settings, its inputs' keys, the folder verified —; KFP's cache knows neither the code inside
        an image tag nor a folder rebuilt since, and would hand on a stale pointer)."""
        task.set_env_variable("DPOFLOW_IMAGE", image)
        if tracked:
            if retries:
                task.set_retry(retries, backoff_duration="30s")
            kubernetes.use_secret_as_env(task, mlflow_secret, MLFLOW_SECRET_KEYS, optional=True)
            kubernetes.use_secret_as_env(task, s3_secret, S3_SECRET_KEYS, optional=True)
        if storage == "shared":  # the step outputs the pointers name
            kubernetes.mount_pvc(task, pvc_name=PVC, mount_path=WORKSPACE)
        task.set_caching_options(cached and storage != "shared")

    @dsl.pipeline(name="candidates", description="per beta: DPO -> evaluation -> registered candidate; then the "
                  "sweep's best is selected, gated and promoted to champion")
    def candidates(config: str, parent_run_id: str, betas: list, dataset: Input[Dataset], pairs: Input[Dataset],
                   reference_model: Input[Model], reference_logps: Input[Dataset], gpus: int, gpu_type: str,
                   node_selector: dict, tolerations: list, mlflow_uri: str, mlflow_secret: str, s3_secret: str,
                   workspace: str, threads_per_task: int):
        # the β tasks log into this pipeline run's MLflow tree and the registry tasks move aliases:
        # never served from KFP's cache
        tasks = []
        with dsl.ParallelFor(betas, parallelism=parallelism) as beta:
            round_pairs, round_logps, round_reference_model, init = pairs, reference_logps, reference_model, \
                reference_model
            previous_policy = previous_results = None
            for r in range(1, rounds + 1):
                if r > 1:  # on-policy: pairs sampled from the previous round's policy, training goes on from it
                    sample = c["round_prefs"](config=config, beta=beta, round=r, data=dataset, sampler=previous_policy,
                                              previous_results=previous_results, threads=threads_per_task,
                                              workspace=workspace)
                    round_reference_model = previous_policy if reference_update == "previous" else reference_model
                    score = c["round_reference"](config=config, beta=beta, round=r, pairs=sample.outputs["pairs"],
                                                 reference_model=round_reference_model, threads=threads_per_task,
                                                 workspace=workspace)
                    sample.set_display_name(f"prefs (round {r})")
                    score.set_display_name(f"reference log-probs (round {r})")
                    round_pairs, round_logps, init = sample.outputs["pairs"], score.outputs["reference_logps"], \
                        previous_policy
                    tasks += [sample, score]
                dpo = c["dpo"](config=config, parent_run_id=parent_run_id, beta=beta, round=r, pairs=round_pairs,
                               reference_model=round_reference_model, reference_logps=round_logps, init_policy=init,
                               data=dataset, gpus=gpus, gpu_type=gpu_type, threads=threads_per_task,
                               workspace=workspace, mlflow_uri=mlflow_uri)
                dpo.set_accelerator_type(gpu_type).set_accelerator_limit(gpus)
                dpo.set_memory_limit("64G").set_cpu_limit("8")
                kubernetes.empty_dir_mount(dpo, volume_name="shm", mount_path="/dev/shm", medium="Memory")  # NCCL
                kubernetes.add_node_selector_json(dpo, node_selector)
                kubernetes.add_toleration_json(dpo, tolerations)
                # every round is evaluated against the fixed reference
                evaluate = c["evaluate"](config=config, beta=beta, round=r, policy=dpo.outputs["policy"],
                                         reference_model=reference_model, data=dataset, pairs=round_pairs,
                                         threads=threads_per_task, workspace=workspace, mlflow_uri=mlflow_uri)
                if rounds > 1:
                    dpo.set_display_name(f"dpo (round {r})")
                    evaluate.set_display_name(f"evaluate (round {r})")
                tasks += [dpo, evaluate]
                previous_policy, previous_results = dpo.outputs["policy"], evaluate.outputs["results"]
            register = c["register"](config=config, parent_run_id=parent_run_id, policy=previous_policy,
                                     results=previous_results, data=dataset, reference_logps=round_logps,
                                     mlflow_uri=mlflow_uri)
        select = c["select"](config=config, versions=dsl.Collected(register.output), parent_run_id=parent_run_id,
                             mlflow_uri=mlflow_uri)
        gate = c["gate"](config=config, version=select.output, data=dataset, mlflow_uri=mlflow_uri)
        with dsl.If(gate.output == "pass", name="gate-passed"):
            promote = c["promote"](config=config, version=select.output, data=dataset, mlflow_uri=mlflow_uri)
        for task in tasks + [register, select, gate, promote]:
            configure(task, tracked=True, cached=False, mlflow_secret=mlflow_secret, s3_secret=s3_secret)

    @dsl.pipeline(name=PIPELINE_NAME, description="DPO alignment: data -> SFT reference -> judged pairs -> "
                  "reference log-probs -> DPO per beta -> evaluation -> MLflow registry (candidate -> champion)")
    def dpo_alignment(
        base_model: str = defaults["base_model"],
        data_kind: str = defaults["data_kind"],
        data_source: str = defaults["data_source"],
        dvc_repo: str = "",
        dvc_path: str = "",
        dvc_rev: str = "",
        betas: list = defaults["betas"],
        loss_type: str = defaults["loss_type"],
        learning_rate: float = defaults["learning_rate"],
        max_steps: int = defaults["max_steps"],
        judge: str = defaults["judge"],
        min_win_rate: float = defaults["min_win_rate"],
        model_name: str = defaults["model_name"],
        gpus: int = 0,
        dpo_nodes: int = defaults["dpo_nodes"],
        gpu_type: str = "nvidia.com/gpu",
        node_selector: dict = {},  # noqa: B006 (KFP reads the default from the signature)
        tolerations: list = [],  # noqa: B006
        mlflow_uri: str = "",
        mlflow_secret: str = "dpoflow-mlflow",
        s3_secret: str = "dpoflow-s3",
        config_overrides: str = "{}",
        config: str = defaults["config"],
        mlflow_run_id: str = "",
        workspace: str = f"{WORKSPACE}/{config.run.name}" if storage == "shared" else "",
        threads_per_task: int = 0,
    ):
        """DPO alignment of a language model, tracked and registered in MLflow.

        Args:
            base_model: base model (folder, hub id or models:/name@alias); empty = build the demo's tiny model.
            data_kind: what the data holds: sft (a corpus: SFT + judged pairs), preferences (pairs), prompts.
            data_source: data file or folder (jsonl, json, parquet, csv, save_to_disk), 'demo' or hub:<id>.
            dvc_repo: read data_source through DVC from this git repo (empty = not through DVC).
            dvc_path: path of the data inside dvc_repo (empty = data_source).
            dvc_rev: git revision of dvc_repo (commit, tag, branch; empty = HEAD).
            betas: the β sweep: one DPO + evaluation + registered candidate per value.
            loss_type: DPO loss: sigmoid, cdpo, robust, hinge or ipo.
            learning_rate: DPO peak learning rate.
            max_steps: DPO optimizer steps.
            judge: evaluation judge: callable:<module>:<fn>, reward_model:<dir|models:/...> or llm.
            min_win_rate: gate: least win rate vs the reference for a champion.
            model_name: MLflow registered model name (deploy models:/<model_name>@champion).
            gpus: GPUs of the DPO task (DDP through accelerate when > 1); 0 = CPU. With dpo_nodes > 1: per node.
            dpo_nodes: nodes that train each β: > 1 = a Kubeflow Trainer TrainJob (torchrun over the nodes).
            gpu_type: accelerator resource of the DPO task, e.g. nvidia.com/gpu.
            node_selector: nodeSelector of the DPO task as JSON, e.g. {"nvidia.com/gpu.product": "H100"}.
            tolerations: tolerations of the DPO task as a JSON list.
            mlflow_uri: MLflow tracking URI (empty = MLFLOW_TRACKING_URI of the pods, else local sqlite).
            mlflow_secret: Secret with MLFLOW_TRACKING_USERNAME/PASSWORD (optional).
            s3_secret: Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/endpoints for MLflow artifacts and DVC (optional).
            config_overrides: further config as a JSON object of dotted keys, e.g. {"dpo.max_steps": 300}.
            config: the base config (params.yaml as JSON) the parameters above override.
            mlflow_run_id: MLflow parent run to log into (empty = MLFLOW_RUN_ID injected by KFP, else a new run).
            workspace: step outputs' folder on the volume all tasks mount (empty: outputs travel as artifacts).
            threads_per_task: CPU threads of each β task (0 = the library default).
        """
        fingerprint = c["fingerprint"](
            config=config, config_overrides=config_overrides, base_model=base_model, data_kind=data_kind,
            data_source=data_source, dvc_repo=dvc_repo, dvc_path=dvc_path, dvc_rev=dvc_rev, betas=betas,
            loss_type=loss_type, learning_rate=learning_rate, max_steps=max_steps, judge=judge,
            min_win_rate=min_win_rate, model_name=model_name, dpo_nodes=dpo_nodes, workspace=workspace, mlflow_uri=mlflow_uri,
            mlflow_run_id=mlflow_run_id, compiled_rounds=rounds)
        run_config = fingerprint.outputs["config"]  # the run's config, resolved once: what every task reads
        data = c["data"](config=run_config, data_md5=fingerprint.outputs["data_md5"], workspace=workspace)
        dataset = data.outputs["dataset"]
        sft = c["sft"](config=run_config, data=dataset, workspace=workspace)
        sft.set_display_name("sft (reference)")
        reference_model = sft.outputs["reference_model"]
        prefs = c["prefs"](config=run_config, data=dataset, reference_model=reference_model, workspace=workspace)
        reference = c["reference"](config=run_config, pairs=prefs.outputs["pairs"], reference_model=reference_model,
                                   workspace=workspace)
        reference.set_display_name("reference log-probs")
        sweep = candidates(config=run_config, parent_run_id=fingerprint.outputs["parent_run_id"], betas=betas,
                           dataset=dataset, pairs=prefs.outputs["pairs"], reference_model=reference_model,
                           reference_logps=reference.outputs["reference_logps"], gpus=gpus, gpu_type=gpu_type,
                           node_selector=node_selector, tolerations=tolerations, mlflow_uri=mlflow_uri,
                           mlflow_secret=mlflow_secret, s3_secret=s3_secret, workspace=workspace,
                           threads_per_task=threads_per_task)
        sweep.set_caching_options(False)
        secrets = dict(mlflow_secret=mlflow_secret, s3_secret=s3_secret)
        # never cached: it tells the cached steps below whether the data (a moving DVC branch) changed
        configure(fingerprint, tracked=True, cached=False, **secrets)
        configure(data, tracked=True, cached=True, **secrets)
        for task in (sft, prefs, reference):  # cached under --storage artifacts while config and data are unchanged
            configure(task, tracked=False, cached=True, **secrets)

    return dpo_alignment
