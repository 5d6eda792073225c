"""The Kubeflow side, checked without a cluster: the compiled pipeline is current and holds what a
cluster needs; submit/schedule send the right REST calls; the multi-node job specs; the image's pins;
the kustomize manifests render and validate against the Kubernetes schemas."""

import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import require

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from dpoflow.config import load_config
    from dpoflow.pipeline.client import compile_all

    out = tmp_path_factory.mktemp("compiled")
    compile_all(out, config=load_config(ROOT / "params.yaml"))
    return out


def test_compiled_files_are_current(compiled):
    """`make compile` output is committed; it must be what the code compiles to now."""
    fresh = sorted(p.relative_to(compiled) for p in compiled.rglob("*.yaml"))
    committed = sorted(p.relative_to(ROOT) for p in [*ROOT.glob("pipelines/*.yaml"), *ROOT.glob("components/*.yaml"),
                                                     *ROOT.glob("manifests/trainer/*.yaml")])
    assert fresh == committed
    for path in fresh:
        assert (compiled / path).read_text() == (ROOT / path).read_text(), f"{path} is stale: run `make compile`"


def test_compiled_spec_holds_the_dag(compiled):
    spec, platform = yaml.safe_load_all((compiled / "pipelines/dpo_alignment.yaml").read_text())
    root = spec["root"]
    parameters = root["inputDefinitions"]["parameters"]
    assert {"base_model", "data_source", "dvc_repo", "dvc_rev", "betas", "loss_type", "learning_rate", "max_steps",
            "gpus", "gpu_type", "judge", "min_win_rate", "model_name", "mlflow_uri", "config_overrides",
            "node_selector", "tolerations", "mlflow_secret", "s3_secret", "dpo_nodes"} <= set(parameters)
    assert parameters["dpo_nodes"]["defaultValue"] == 1 and parameters["dpo_nodes"]["parameterType"] == "NUMBER_INTEGER"
    assert parameters["betas"]["defaultValue"] == [0.1, 0.5, 2.0] and parameters["betas"]["parameterType"] == "LIST"
    assert parameters["gpus"]["parameterType"] == "NUMBER_INTEGER"
    assert "description" in parameters["min_win_rate"]  # the UI shows each parameter's meaning
    tasks = root["dag"]["tasks"]
    assert set(tasks) == {"fingerprint", "data", "sft", "prefs", "reference", "candidates"}
    sweep = spec["components"]["comp-candidates"]["dag"]["tasks"]
    assert set(sweep) == {"for-loop-1", "select", "gate", "condition-2"}
    loop = sweep["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--betas"
    assert set(spec["components"]["comp-for-loop-1"]["dag"]["tasks"]) == {"dpo", "evaluate", "register"}
    assert sweep["select"]["inputs"]["parameters"]["versions"]["taskOutputParameter"]["producerTask"] == "for-loop-1"
    gate = sweep["condition-2"]
    assert gate["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--gate-Output'] == 'pass'"
    assert set(spec["components"]["comp-condition-2"]["dag"]["tasks"]) == {"promote"}
    assert tasks["fingerprint"]["cachingOptions"] == {}  # never cached
    # the config's one route: fingerprint resolves it; every other step takes that string as `config`,
    # directly or through the sub-pipeline's input of the same name (no sections, no second copy)
    steps = {name: task for name, task in [*tasks.items(), *sweep.items(),
                                           *spec["components"]["comp-for-loop-1"]["dag"]["tasks"].items(),
                                           *spec["components"]["comp-condition-2"]["dag"]["tasks"].items()]
             if not task["componentRef"]["name"].startswith(("comp-for-loop", "comp-condition", "comp-candidates"))}
    assert len(steps) == 11
    for name, task in steps.items():
        inputs = spec["components"][task["componentRef"]["name"]]["inputDefinitions"]
        assert not any(key.endswith("_cfg") or key == "run_info" for part in inputs.values() for key in part), name
        if name != "fingerprint":
            source = task["inputs"]["parameters"]["config"]
            assert source in ({"taskOutputParameter": {"outputParameterKey": "config", "producerTask": "fingerprint"}},
                              {"componentInputParameter": "pipelinechannel--config"},
                              {"componentInputParameter": "config"}), (name, source)
    assert tasks["candidates"]["inputs"]["parameters"]["config"]["taskOutputParameter"]["producerTask"] == "fingerprint"
    # shared storage (the committed default): the step keys decide reuse, KFP's cache never does
    assert all(task["cachingOptions"] == {} for task in steps.values())
    dpo = spec["deploymentSpec"]["executors"]["exec-dpo"]["container"]
    assert dpo["resources"]["accelerator"] == {
        "resourceCount": "{{$.inputs.parameters['pipelinechannel--gpus']}}",
        "resourceType": "{{$.inputs.parameters['pipelinechannel--gpu_type']}}"}
    assert dpo["image"] == "dpoflow/dpoflow:0.1.0"
    assert "pip install" not in json.dumps(spec["deploymentSpec"])  # pods install nothing at start
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-dpo"]["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "shm"}]
    secrets = executors["exec-dpo"]["secretAsEnv"]
    assert {s["secretNameParameter"]["componentInputParameter"] for s in secrets} == {
        "pipelinechannel--mlflow_secret", "pipelinechannel--s3_secret"}
    assert all(s["optional"] for s in secrets)
    assert any(e["envVar"] == "AWS_SECRET_ACCESS_KEY" for s in secrets for e in s["keyToEnv"])
    assert executors["exec-dpo"]["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] == \
        "pipelinechannel--node_selector"
    assert "retryPolicy" in tasks["fingerprint"] and "retryPolicy" in sweep["select"]


def test_shared_storage_mounts_the_workspace_volume_into_every_task(compiled, tmp_path):
    """The committed pipeline (storage shared, the cluster default): every executor mounts the RWX
    volume the Trainer runtime mounts too, at the path the workspace parameter's default lies under;
    compiled with storage artifacts, none mounts it and the workspace is empty."""
    from dpoflow.config import load_config
    from dpoflow.pipeline.client import compile_all
    from dpoflow.trainjob import runtime_manifest

    def read(folder: Path):
        spec, platform = yaml.safe_load_all((folder / "pipelines/dpo_alignment.yaml").read_text())
        return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    spec, executors = read(compiled)
    runtime_volumes = runtime_manifest("x")["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"]["spec"]["volumes"]
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in runtime_volumes if "persistentVolumeClaim" in v)
    every = set(spec["deploymentSpec"]["executors"])
    assert every == {name for name, executor in executors.items()
                     if executor.get("pvcMount") == [{"constant": claim, "mountPath": "/workspace",
                                                      "pvcNameParameter": {"runtimeValue": {"constant": claim}}}]}
    assert len(every) == 11  # fingerprint ... promote: every task of the DAG
    assert spec["root"]["inputDefinitions"]["parameters"]["workspace"]["defaultValue"] == "/workspace/demo"

    compile_all(tmp_path, config=load_config(ROOT / "params.yaml"), storage="artifacts")
    spec, executors = read(tmp_path)
    assert not any("pvcMount" in executor for executor in executors.values())
    tasks = spec["root"]["dag"]["tasks"]  # no volume to reuse from: KFP's cache, while data and settings are unchanged
    assert tasks["reference"]["cachingOptions"]["enableCache"] is True and tasks["fingerprint"]["cachingOptions"] == {}
    assert spec["root"]["inputDefinitions"]["parameters"]["workspace"]["defaultValue"] == ""


def test_rounds_are_unrolled_per_beta(tmp_path):
    """run.rounds=3 compiles to three dpo -> evaluate groups inside the β loop, each later round
    sampling from the previous round's policy; a run asking for other rounds than compiled is refused."""
    from kfp import compiler

    from dpoflow.config import Config, ConfigError
    from dpoflow.pipeline.dag import build_pipeline
    from dpoflow.pipeline.tasks import fingerprint_task

    cfg = Config.model_validate({"run": {"rounds": 3}})
    compiler.Compiler().compile(build_pipeline(config=cfg), str(tmp_path / "p.yaml"))
    spec = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert set(loop) == {"dpo", "evaluate", "round-prefs", "round-reference", "dpo-2", "evaluate-2", "round-prefs-2",
                         "round-reference-2", "dpo-3", "evaluate-3", "register"}
    sampler = loop["round-prefs-2"]["inputs"]["artifacts"]["sampler"]["taskOutputArtifact"]
    assert sampler == {"producerTask": "dpo-2", "outputArtifactKey": "policy"}
    assert loop["dpo-3"]["inputs"]["artifacts"]["init_policy"]["taskOutputArtifact"]["producerTask"] == "dpo-2"
    # the reference stays fixed: round 3 is scored and evaluated against the SFT model
    for task in ("round-reference-2", "evaluate-3"):
        ref = loop[task]["inputs"]["artifacts"]["reference_model"]
        assert ref["componentInputArtifact"] == "pipelinechannel--reference_model"
    assert loop["register"]["inputs"]["artifacts"]["policy"]["taskOutputArtifact"]["producerTask"] == "dpo-3"
    assert loop["dpo-3"]["inputs"]["parameters"]["round"]["runtimeValue"]["constant"] == 3
    assert spec["root"]["dag"]["tasks"]["fingerprint"]["inputs"]["parameters"]["compiled_rounds"]["runtimeValue"] == {
        "constant": 3}
    with pytest.raises(ConfigError, match="compiled with 1 on-policy round"):
        fingerprint_task(config="{}", flat={}, config_overrides='{"run.rounds": 2, "tracking.enabled": false, '
                         '"registry.enabled": false}', dvc=("", "", ""), workspace="", mlflow_uri="", mlflow_run_id="",
                         compiled_rounds=1)


def test_cron_and_params_are_checked_before_any_request():
    from dpoflow.pipeline.client import parse_params, validate_cron

    assert validate_cron("0 0 3 * * *") == "0 0 3 * * *"
    with pytest.raises(ValueError, match="has 5 fields; Kubeflow Pipelines uses 6, seconds first: '0 0 3 \\* \\* \\*'"):
        validate_cron("0 3 * * *")
    with pytest.raises(ValueError, match="must have 6 fields"):
        validate_cron("daily")
    assert parse_params(["betas=[0.1, 0.3]", "max_steps=200", "learning_rate=1e-5", "loss_type=ipo"],
                        ROOT / "pipelines/dpo_alignment.yaml") == {
        "betas": [0.1, 0.3], "max_steps": 200, "learning_rate": 1e-5, "loss_type": "ipo"}
    with pytest.raises(ValueError, match="--param bets: the pipeline has no such parameter"):
        parse_params(["bets=[0.1]"], ROOT / "pipelines/dpo_alignment.yaml")
    with pytest.raises(ValueError, match="expected number integer"):
        parse_params(["max_steps=lots"], ROOT / "pipelines/dpo_alignment.yaml")


class _Recorder(BaseHTTPRequestHandler):
    """Answers the KFP v2beta1 REST API as a server would (minimal bodies) and records each call."""
    calls: list = []

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.calls.append({"method": self.command, "path": self.path, "body": body,
                           "auth": self.headers.get("Authorization")})
        path, post = self.path, self.command == "POST"
        if "/experiments" in path:
            answer = {"experiment_id": "exp-1", "display_name": "dpoflow"} if post else {}
        elif "/recurringruns" in path:
            answer = {"recurring_run_id": "rr-1"}
        elif "/runs" in path:
            answer = {"run_id": "run-1"}
        elif "/pipelines/upload_version" in path:
            answer = {"pipeline_version_id": "pv-1", "pipeline_id": "p-1"}
        elif "/pipelines/upload" in path:
            answer = {"pipeline_id": "p-1", "display_name": "dpo-alignment"}
        else:
            answer = {}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_server():
    """No KFP server can run here: a local HTTP server records the REST calls the real kfp.Client makes."""
    _Recorder.calls = []
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", _Recorder.calls
    server.shutdown()


def _dpoflow(*args):
    return subprocess.run([str(Path(sys.executable).parent / "dpoflow"), *args], cwd=ROOT, capture_output=True, text=True)


def test_submit_sends_the_compiled_spec_and_parameters(kfp_server):
    host, calls = kfp_server
    result = _dpoflow("submit", "--host", host, "--param", "betas=[0.1, 0.3]", "--param", "max_steps=300",
                      "--experiment", "nightly", "--run-name", "try-1", "--token", "t0k3n")
    assert result.returncode == 0, result.stderr
    assert "run run-1 in experiment 'nightly'" in result.stdout
    [experiment] = [c for c in calls if c["method"] == "POST" and c["path"].startswith("/apis/v2beta1/experiments")]
    assert json.loads(experiment["body"])["display_name"] == "nightly"
    [run] = [c for c in calls if c["method"] == "POST" and c["path"] == "/apis/v2beta1/runs"]
    body = json.loads(run["body"])
    assert body["display_name"] == "try-1" and body["experiment_id"] == "exp-1"
    assert body["runtime_config"]["parameters"] == {"betas": [0.1, 0.3], "max_steps": 300}
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "dpo-alignment"
    assert run["auth"] == "Bearer t0k3n"


def test_schedule_uploads_the_pipeline_and_creates_a_recurring_run(kfp_server):
    host, calls = kfp_server
    bad = _dpoflow("schedule", "--host", host, "--cron", "0 3 * * *")
    assert bad.returncode == 1 and "6, seconds first" in bad.stderr and not calls  # refused before any request
    unknown = _dpoflow("schedule", "--host", host, "--cron", "0 0 3 * * *", "--param", "nope=1")
    assert unknown.returncode == 1 and "no such parameter" in unknown.stderr and not calls
    result = _dpoflow("schedule", "--host", host, "--cron", "0 0 3 * * *", "--param", "dvc_rev=main",
                      "--max-concurrency", "1")
    assert result.returncode == 0, result.stderr
    posts = [c["path"].split("?")[0] for c in calls if c["method"] == "POST"]
    assert posts == ["/apis/v2beta1/experiments", "/apis/v2beta1/pipelines/upload",
                     "/apis/v2beta1/pipelines/upload_version", "/apis/v2beta1/recurringruns"]
    upload = next(c for c in calls if c["path"].startswith("/apis/v2beta1/pipelines/upload?"))
    assert b"dpo-alignment" in upload["body"] and b"comp-for-loop-1" in upload["body"]
    recurring = json.loads(calls[-1]["body"])
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert int(recurring["max_concurrency"]) == 1 and recurring["no_catchup"] is True
    assert recurring["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "pv-1"}
    assert recurring["runtime_config"]["parameters"] == {"dvc_rev": "main"}


def _spec(**changes):
    from dpoflow.config import DpoConfig
    from dpoflow.pipeline.multinode import JobSpec

    values = dict(beta=0.1, dpo_config=DpoConfig().model_dump_json(), image="reg/dpoflow:1", nodes=4, gpus_per_node=8,
                  pvc_name="dpoflow-workspace", pairs_path="run/prefs", reference_model_path="run/sft/model",
                  reference_path="run/reference", output_path="run/dpo/beta-0.1", namespace="team",
                  secret_name="dpoflow-s3", name="job-1")
    return JobSpec(**{**values, **changes})


def test_trainjob_spec():
    from dpoflow.pipeline.multinode import trainjob

    job = trainjob(_spec())
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"] == {"name": "job-1", "namespace": "team", "labels": {"app": "dpoflow"}}
    trainer = job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert trainer["image"] == "reg/dpoflow:1" and trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 8}
    script = trainer["command"][2]
    assert "exec torchrun -m dpoflow.cli dpo -c /tmp/dpoflow-config.json" in script
    assert "--pairs /workspace/run/prefs --reference-model /workspace/run/sft/model" in script
    assert "--reference-dir /workspace/run/reference --out /workspace/run/dpo/beta-0.1 --resume" in script
    config = json.loads(re.search(r"printf '%s' '(.*?)' >", script).group(1))
    assert config["dpo"]["beta"] == 0.1 and config["dpo"]["loss_type"] == "sigmoid"
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in trainer["env"] if "valueFrom" in e}
    assert secret_env["AWS_SECRET_ACCESS_KEY"] == "dpoflow-s3" and "CHANGE" not in json.dumps(job)
    override = job["spec"]["podSpecOverrides"][0]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "dpoflow-workspace"}} in override["volumes"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in override["containers"][0]["volumeMounts"]


def test_pytorchjob_spec_validates_its_pod_template():
    import kubernetes_validate

    from dpoflow.pipeline.multinode import pytorchjob

    job = pytorchjob(_spec(nodes=3))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "8"
    # the CRD's schema is not shipped here; its pod template is a core PodTemplateSpec: validate that
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": replicas["Worker"]["template"]}
    kubernetes_validate.validate(template, "1.32.0", strict=True)
    assert "Worker" not in pytorchjob(_spec(nodes=1))["spec"]["pytorchReplicaSpecs"]


def test_launcher_waits_for_the_job_and_fails_with_it(monkeypatch):
    """launch() against a fake CustomObjects API (no cluster here): creates the object, polls its
    conditions, raises with the job's message on failure."""
    from dpoflow.pipeline import multinode

    class Api:
        def __init__(self, final):
            self.created, self.polls, self.final = [], 0, final

        def create_namespaced_custom_object(self, group, version, namespace, plural, body):
            self.created.append((group, version, namespace, plural, body))

        def get_namespaced_custom_object(self, group, version, namespace, plural, name):
            self.polls += 1
            done = self.polls >= 2
            return {"status": {"conditions": [{"type": self.final, "status": "True" if done else "False",
                                               "message": "node 2 OOMKilled"}]}}

    monkeypatch.setattr(multinode, "_print_logs", lambda namespace, selector: None)
    ok = Api("Complete")
    assert multinode.launch(_spec(), "trainjob", poll_s=0, api=ok) == "run/dpo/beta-0.1"
    assert ok.created[0][:4] == ("trainer.kubeflow.org", "v1alpha1", "team", "trainjobs") and ok.polls == 2
    with pytest.raises(RuntimeError, match="PyTorchJob job-1 failed: node 2 OOMKilled"):
        multinode.launch(_spec(), "pytorchjob", poll_s=0, api=Api("Failed"))
    with pytest.raises(ValueError, match="unknown engine"):
        multinode.launch(_spec(), "mpijob", api=ok)


def test_dockerfile_pins_match_pyproject():
    dockerfile = (ROOT / "components/Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    version = torch_pin.removeprefix("torch==")
    assert f"spec=torch=={version}+cpu;" in dockerfile and f"spec=torch==={version};" in dockerfile  # cpu / cuda
    # the dependencies with pyproject's own pins, installed before the source is copied (a src/ edit keeps them)
    assert "COPY pyproject.toml /" in dockerfile and "['project']['dependencies']" in dockerfile
    assert "COPY --from=requirements /requirements.txt" in dockerfile  # cached on the list, not the whole file
    assert dockerfile.index("pip install -r /tmp/requirements.txt") < dockerfile.index("COPY src") < \
        dockerfile.index("pip install --no-deps .")
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11\.\d+-slim-\w+$", dockerfile, re.M)  # a pinned default base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    assert re.search(r"^USER 1000$", dockerfile, re.M) and "dpoflow --help" in dockerfile
    assert f'"{pyproject["project"]["version"]}"' in (ROOT / "src/dpoflow/__init__.py").read_text()
    assert "-c /tmp/constraints.txt" in dockerfile  # the image runs the venv's library versions


def test_every_dependency_is_pinned_where_pyproject_allows_and_installed_so():
    """constraints.txt (make install, the image and CI install with it) pins every dependency of
    pyproject, runtime and dev, at a version inside pyproject's range — and this environment has
    exactly those versions: a fresh clone runs the demo with the libraries its figures came from."""
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in [*pyproject["dependencies"], *pyproject["optional-dependencies"]["dev"]]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "torch":  # pinned in pyproject itself (its CPU and CUDA builds differ)
            assert name not in pins
            continue
        assert name in pins, f"{name} is not in constraints.txt: run `make lock`"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]} outside {line}"
    stale = {name: (pin, version(name)) for name, pin in pins.items() if version(name) != pin}
    assert not stale, f"installed versions differ from constraints.txt (pin, installed): {stale}; run `make install`"


def _kustomize() -> list[str]:
    """The pinned kustomize `make install` puts beside the venv's python, else one on PATH, else kubectl's."""
    pinned = Path(sys.executable).parent / "kustomize"
    if pinned.exists() or shutil.which("kustomize"):
        return [str(pinned) if pinned.exists() else "kustomize", "build"]
    require("" if shutil.which("kubectl") else "kustomize is not installed: make install fetches it (.ci/kustomize.py)")
    return ["kubectl", "kustomize"]


@pytest.mark.parametrize("overlay", ["local", "cluster"])
def test_manifests_render_and_validate(overlay):
    import kubernetes_validate

    rendered = subprocess.run([*_kustomize(), str(ROOT / "manifests/overlays" / overlay)], check=True,
                              capture_output=True, text=True).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Deployment", "dpoflow-mlflow"), ("Service", "dpoflow-mlflow"), ("StatefulSet", "dpoflow-postgres"),
            ("Secret", "dpoflow-s3"), ("Secret", "dpoflow-mlflow"), ("Role", "dpoflow-pipeline"),
            ("RoleBinding", "dpoflow-pipeline"), ("PersistentVolumeClaim", "dpoflow-workspace"),
            ("ServiceAccount", "dpoflow-serving")} <= kinds
    for obj in objects:
        kubernetes_validate.validate(obj, "1.32.0", strict=True)
    mlflow = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "dpoflow-mlflow")
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "postgresql://" in args and "--allowed-hosts" in args and "s3://" in args
    role = next(o for o in objects if o["kind"] == "Role")
    assert any("trainjobs" in rule["resources"] and "create" in rule["verbs"] for rule in role["rules"])
    namespace = "dpoflow-dev" if overlay == "local" else "kubeflow-user"
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] not in cluster_scoped} == {namespace}
    # the SDK reads the ClusterTrainingRuntime as the pipeline's account, in the overlay's namespace
    (binding,) = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dpoflow-pipeline", "namespace": namespace}]
    (runtimes,) = [o for o in objects if o["kind"] == "ClusterRole"]
    assert runtimes["rules"] == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["clustertrainingruntimes"],
                                  "verbs": ["get", "list"]}]


def test_the_trainer_runtime_is_what_the_trainer_accepts():
    """The ClusterTrainingRuntime of multi-node DPO against Kubeflow Trainer's own CRD schema (unknown
    fields refused), and what the SDK's container backend reads from it."""
    import jsonschema

    from conftest import validate_against_crd
    from dpoflow.trainjob import RUNTIME_FILE

    runtime = yaml.safe_load((ROOT / RUNTIME_FILE).read_text())
    validate_against_crd(runtime, "trainer-clustertrainingruntime-v1alpha1.json.gz")
    broken = json.loads(json.dumps(runtime))
    broken["spec"]["mlPolicy"]["numNode"] = broken["spec"]["mlPolicy"].pop("numNodes")
    with pytest.raises(jsonschema.ValidationError, match="numNode"):
        validate_against_crd(broken, "trainer-clustertrainingruntime-v1alpha1.json.gz")
    from kubeflow.trainer.backends.container.runtime_loader import get_training_runtime_from_sources

    loaded = get_training_runtime_from_sources("dpoflow-dpo", [f"file://{ROOT / RUNTIME_FILE}"])
    from dpoflow.pipeline.components import DEFAULT_IMAGE

    assert (loaded.trainer.image, loaded.trainer.framework) == (DEFAULT_IMAGE, "torch")


def test_in_a_cluster_pod_the_trainjob_goes_to_the_clusters_trainer(tmp_path, monkeypatch):
    """Inside a pod (KUBERNETES_SERVICE_HOST; here DPOFLOW_TRAINJOB_BACKEND=kubernetes) the DPO task's
    run_dpo_trainjob call goes through the SDK's Kubernetes backend: a TrainJob on the dpoflow-dpo
    ClusterTrainingRuntime that Trainer's own CRD schema accepts (unknown fields refused), N nodes x
    the task's GPUs, every path under /workspace (the volume the pod and the nodes mount). A job the
    cluster fails before any node ran fails the task saying where to look, and is deleted. No cluster
    runs here: a loopback server answers the Kubernetes API calls the SDK makes."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from conftest import validate_against_crd
    from dpoflow.config import DpoConfig, config_dict
    from dpoflow.trainjob import RUNTIME_FILE, TrainJobError, run_dpo_trainjob

    runtime = yaml.safe_load((ROOT / RUNTIME_FILE).read_text())
    created, deleted = {}, []
    trainer = "/apis/trainer.kubeflow.org/v1alpha1"

    class KubernetesApi(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            path = self.path.split("?")[0]
            if path == f"{trainer}/clustertrainingruntimes/dpoflow-dpo":
                return self._answer(200, runtime)
            if path.startswith(f"{trainer}/namespaces/team/trainjobs/") and path.rsplit("/", 1)[1] in created:
                job = json.loads(json.dumps(created[path.rsplit("/", 1)[1]]))
                job["metadata"].update(namespace="team", creationTimestamp="2026-12-04T00:00:00Z")
                job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "JobSetFailed",
                                                 "message": "no PVC", "lastTransitionTime": "2026-12-04T00:00:01Z"}]}
                return self._answer(200, job)
            if path == "/api/v1/namespaces/team/pods":
                return self._answer(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []})
            self._answer(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                               "code": 404})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == f"{trainer}/namespaces/team/trainjobs"
            created[body["metadata"]["name"]] = body
            self._answer(201, body)

        def do_DELETE(self):  # noqa: N802
            deleted.append(self.path.rsplit("/", 1)[1])
            self._answer(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), KubernetesApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "pod",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "pod", "context": {"cluster": "c", "user": "u", "namespace": "team"}}]}))
    # (the kubernetes package reads KUBECONFIG when it is imported: as if it had been set at start)
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.setenv("DPOFLOW_TRAINJOB_BACKEND", "kubernetes")
    volume = tmp_path / "workspace"  # what the pod mounts at /workspace
    run = volume / "demo"
    try:
        with pytest.raises(TrainJobError, match="failed before its nodes ran: see `kubectl describe trainjob"):
            run_dpo_trainjob({"dpo": config_dict(DpoConfig(beta=0.5, reference="cached"))}, pairs=run / "prefs",
                             reference_model=run / "sft" / "model", reference_dir=run / "reference",
                             init_model=run / "sft" / "model", out_dir=run / "dpo" / "beta-0.5", root=volume, nodes=2,
                             processes_per_node=4, gpus=True, image="dpoflow/dpoflow:0.1.0", log=lambda *a: None)
    finally:
        server.shutdown()
    ((name, job),) = created.items()
    validate_against_crd(job, "trainer-trainjob-v1alpha1.json.gz")
    assert deleted == [name] and name.startswith("dpoflow-dpo-")
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "dpoflow-dpo"
    assert spec["trainer"]["numNodes"] == 2 and spec["trainer"]["image"] == "dpoflow/dpoflow:0.1.0"
    assert spec["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    command = " ".join(spec["trainer"]["command"])
    for argument in (f"/workspace/.trainjobs/config-{name}.yaml", "--out', '/workspace/demo/dpo/beta-0.5",
                     "--pairs', '/workspace/demo/prefs", "--reference-dir', '/workspace/demo/reference",
                     "--init-model', '/workspace/demo/sft/model"):
        assert argument in command, command
    assert (volume / ".trainjobs" / f"config-{name}.yaml").exists()  # every node reads the resolved config there
