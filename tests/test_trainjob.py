"""`dpoflow dpo --nodes 2`: a Kubeflow Trainer TrainJob through the Kubeflow SDK's container backend, two
containers of the dpoflow image (one per node) on a per-job network, torchrun + gloo between them, the
inputs and the output on one shared folder. The DDP equivalence across nodes, a killed node, an image
that does not exist; nothing left running after any of them."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import LEARN, assert_same_weights, complete_checkpoint
from dpoflow.config import DpoConfig
from dpoflow.dpo.train import run_dpo
from test_containers import IMAGE, _engine, containers_ready  # noqa: F401 (the fixture skips without an image)

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
SETTINGS = dict(max_steps=5, per_device_batch_size=4, learning_rate=1e-3, max_length=64, log_every=1, seed=3,
                warmup_steps=2, scheduler="linear")
LABEL = "trainer.kubeflow.org/trainjob-name"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def shared(tmp_path, pairs_dir, tiny_model_dir):
    """The volume every node mounts: the pairs, the reference model and its log-probs under one folder."""
    from dpoflow.dpo.reference import run_reference

    root = tmp_path / "shared"
    shutil.copytree(pairs_dir, root / "prefs")
    shutil.copytree(tiny_model_dir, root / "sft" / "model")
    run_reference(root / "prefs", root / "sft" / "model", root / "reference", max_length=64)
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)  # pytest's folders are private to root
    return root


def _dpo(shared: Path, out: str, *extra: str, **settings) -> subprocess.Popen:
    command = [str(BIN / "dpoflow"), "dpo", "--nodes", "2", "--shared", str(shared), "--image", IMAGE,
               "--pairs", str(shared / "prefs"), "--reference-model", str(shared / "sft" / "model"),
               "--reference-dir", str(shared / "reference"), "--out", str(shared / out), *extra]
    command += [f"--set=dpo.{k}={v}" for k, v in {**SETTINGS, **settings}.items()]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=shared.parent)


def _left_behind() -> list[str]:
    containers = subprocess.run([_engine(), "ps", "-a", "--filter", f"label={LABEL}", "--format", "{{.Names}}"],
                                capture_output=True, text=True).stdout.split()
    networks = subprocess.run([_engine(), "network", "ls", "--format", "{{.Name}}"], capture_output=True,
                              text=True).stdout.split()
    return containers + [n for n in networks if n.startswith("dpoflow-dpo-")]


def test_two_nodes_give_the_weights_and_metrics_of_one_process(tmp_path, shared):
    # one process with the global batch of 2 nodes x 1 process x 4 pairs
    run_dpo(DpoConfig(**{**SETTINGS, "per_device_batch_size": 8}), shared / "prefs", shared / "sft" / "model",
            tmp_path / "one", reference_dir=shared / "reference")
    started = time.monotonic()
    two = _dpo(shared, "two")
    stdout, stderr = two.communicate(timeout=900)
    assert two.returncode == 0, stderr[-3000:]
    print(f"2 nodes x 1 process: {time.monotonic() - started:.1f} s wall (containers included)")
    assert "node-0 | " in stdout  # rank 0's log streamed
    summary = json.loads((shared / "two" / "train_summary.json").read_text())
    assert (summary["nodes"], summary["processes"], summary["global_batch"]) == (2, 2, 8)
    assert json.loads((tmp_path / "one" / "train_summary.json").read_text())["nodes"] == 1
    assert_same_weights(tmp_path / "one", shared / "two", atol=1e-5)
    for a, b in zip(_metrics(tmp_path / "one"), _metrics(shared / "two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # a lost x world factor would double it
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], abs=1e-9)  # one schedule step per step
    assert _left_behind() == []


def test_a_killed_node_fails_the_job_naming_it_and_the_rerun_resumes_to_the_same_weights(tmp_path, shared):
    # a step takes ~30 ms on 2 nodes here: the kill lands within the first checkpoints of 200 steps (a
    # smaller learning rate than the others: Adam turns float noise into steps of ~lr over many steps)
    long = dict(max_steps=200, checkpoint_every=2, learning_rate=1e-4)
    run_dpo(DpoConfig(**{**SETTINGS, **long, "per_device_batch_size": 8}), shared / "prefs",
            shared / "sft" / "model", tmp_path / "one", reference_dir=shared / "reference")
    job = _dpo(shared, "two", **long)
    deadline = time.monotonic() + 600
    # a complete checkpoint on the shared volume, then the kill
    while not any(complete_checkpoint(p) for p in (shared / "two.partial").glob("checkpoints/step-*")):
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in 600 s"
        time.sleep(0.02)
    node = subprocess.run([_engine(), "ps", "--filter", "label=trainer.kubeflow.org/step=node-1", "--format",
                           "{{.Names}}"], capture_output=True, text=True).stdout.split()
    assert len(node) == 1
    subprocess.run([_engine(), "kill", node[0]], check=True, capture_output=True)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 1
    assert "node-1 exited with code 137" in stderr and "its last lines" in stderr
    assert not (shared / "two" / "model" / "model.safetensors").exists()
    assert _left_behind() == []

    resumed = _dpo(shared, "two", "--resume", **long)
    stdout, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr[-3000:]
    assert json.loads((shared / "two" / "timing.json").read_text())["resumed_from"] > 0
    assert_same_weights(tmp_path / "one", shared / "two", atol=1e-5)
    assert _left_behind() == []


def test_a_node_that_cannot_start_fails_at_once_with_the_reason(shared):
    started = time.monotonic()
    job = subprocess.run([str(BIN / "dpoflow"), "dpo", "--nodes", "2", "--shared", str(shared), "--image",
                          "dpoflow/no-such-image:0", "--pairs", str(shared / "prefs"), "--reference-model",
                          str(shared / "sft" / "model"), "--reference-dir", str(shared / "reference"), "--out",
                          str(shared / "never")], capture_output=True, text=True, cwd=shared.parent, timeout=300)
    assert job.returncode == 1 and time.monotonic() - started < 120
    assert "dpoflow/no-such-image:0" in job.stderr and "not found locally" in job.stderr
    assert _left_behind() == []


def test_an_input_off_the_shared_volume_is_named(shared, tmp_path, tiny_model_dir):
    job = subprocess.run([str(BIN / "dpoflow"), "dpo", "--nodes", "2", "--shared", str(shared), "--pairs",
                          str(shared / "prefs"), "--reference-model", str(tiny_model_dir), "--reference-dir",
                          str(shared / "reference"), "--out", str(shared / "x")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert job.returncode == 1
    assert f"{tiny_model_dir} is not under the shared folder {shared}" in job.stderr


def test_the_pipeline_trains_each_beta_on_two_nodes_under_both_runners(tmp_path, learning_process_run):
    """`dpoflow run --set dpo.nodes=2`: every β's DPO task starts a 2-node TrainJob and hands on its
    policy like a 1-node one. Process runner (one β): the run's folder is the nodes' /workspace. Container
    runner (shared storage): the run folder, which every task container mounts at its own path, is;
    the DPO tasks alone get the engine's socket. Both give the weights and losses of the 1-node pipeline with the
    same global batch (2 nodes x 4 = 1 x 8), record 2 nodes x 1 process, and register every β."""
    from mlflow import MlflowClient

    from test_pipeline import env_for, run_args

    def run(out: str, *settings: str, runner: str = "process"):
        args = run_args(tmp_path / out, "run.name=nodes", *LEARN, *settings)
        result = subprocess.run(args + ["--runner", runner, "--image", IMAGE], capture_output=True, text=True,
                                cwd=tmp_path, env={**env_for(tmp_path), "MLFLOW_TRACKING_URI":
                                                   f"sqlite:///{tmp_path / (out + '.db')}"})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return json.loads((tmp_path / out / "nodes" / "summary.json").read_text()), result.stdout

    _, one = learning_process_run  # the same config on 1 node (dpo.per_device_batch_size=8)
    # the process runner trains one β (the β loop on TrainJobs is the container run's: both β)
    process, _ = run("process", "dpo.nodes=2", "dpo.per_device_batch_size=4", "run.betas=[0.1]")
    container, stdout = run("container", "dpo.nodes=2", "dpo.per_device_batch_size=4", runner="container")
    assert "dpo.nodes=2: the DPO tasks start TrainJobs on this engine" in stdout
    # shared storage (the cluster default): the step outputs stay in the run folder every task mounts,
    # where the process runner puts them; only pointers travel as artifacts: all the tasks together
    # read less than one copy of the model, and no task but evaluate (its HTML report) writes a tenth of one
    assert container["storage"] == "shared" and "artifact_bytes" not in process
    moved = container["artifact_bytes"]
    assert moved["read"] == sum(t["read"] for t in moved["tasks"])
    policies = [Path(policy) for policy in container["policies"].values()]
    assert {p.parent for p in policies} == {tmp_path / "container" / "nodes" / "dpo" / f"beta-{b}" for b in (0.1, 0.5)}
    model_bytes = (policies[0] / "model.safetensors").stat().st_size
    assert {t["task"] for t in moved["tasks"]} >= {"sft", "prefs", "reference", "dpo", "evaluate", "register"}
    assert moved["read"] < model_bytes, moved
    assert all(t["written"] < model_bytes / 10 for t in moved["tasks"] if t["task"] != "evaluate"), moved
    assert _left_behind() == []
    for summary, store in ((process, "process.db"), (container, "container.db")):
        registry = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / store}")
        assert len(registry.search_model_versions("name='dpoflow-demo'")) == len(summary["policies"])  # every β registered
        for name, policy in summary["policies"].items():
            trained = Path(policy).parent
            record = json.loads((trained / "train_summary.json").read_text())
            assert (record["nodes"], record["processes"], record["global_batch"]) == (2, 2, 8)
            single = Path(one["policies"][name]).parent
            assert json.loads((single / "train_summary.json").read_text())["nodes"] == 1
            assert_same_weights(single, trained, atol=1e-5)
            losses = [m["loss"] for m in _metrics(trained)]
            assert losses == pytest.approx([m["loss"] for m in _metrics(single)], abs=1e-5)
            # the nodes cannot reach the run's MLflow: the task records their metrics.jsonl in the β run
            (run_id,) = [r.info.run_id for r in registry.search_runs(
                [registry.get_experiment_by_name("dpoflow").experiment_id], f"attributes.run_name = '{name}'")]
            history = registry.get_metric_history(run_id, "loss")
            assert [(m.step, m.value) for m in history] == [(m["step"], m["loss"]) for m in _metrics(trained)]
