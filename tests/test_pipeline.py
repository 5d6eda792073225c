"""`dpoflow run` = the KFP pipeline on kfp's real local runner, end to end on a tiny config: every
step really runs (each β in the ParallelFor, select, the gate, promote), MLflow holds the run tree
and the registered versions; a rerun reuses every step; a SIGKILLed run, started again, finishes with
the same metrics."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import complete_checkpoint, require

ROOT = Path(__file__).resolve().parents[1]
TINY = ["run.name=tiny", "run.betas=[0.1,0.5]", "data.demo.n_reviews=400", "data.eval_fraction=0.3",
        "model.preset=tiny", "model.vocab_size=400", "sft.max_steps=30", "sft.per_device_batch_size=16",
        "prefs.max_new_tokens=16", "prefs.max_prompts=64", "prefs.max_eval_prompts=24", "dpo.max_steps=8",
        "dpo.per_device_batch_size=8", "dpo.checkpoint_every=0", "eval.max_prompts=24", "eval.max_new_tokens=16"]
# a judge a tiny model learns in 20 DPO steps (longer completions), so the gate can pass
LEARNABLE = ["dpo.learning_rate=0.003", "dpo.max_steps=20", "prefs.judge=callable:judges_for_tests:longer",
             "eval.judge=callable:judges_for_tests:longer", "registry.min_win_rate=0.55"]
MODEL = "dpoflow-demo"


def run_args(out: Path, *settings: str) -> list[str]:
    return [str(Path(sys.executable).parent / "dpoflow"), "run", "-c", str(ROOT / "params.yaml"),
            f"--set=run.output_dir={out}"] + [f"--set={s}" for s in [*TINY, *settings]]


def env_for(tmp_path: Path) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "PYTHONPATH": str(Path(__file__).parent)}


def dpoflow_run(tmp_path, *settings, out=None):
    result = subprocess.run(run_args(out or tmp_path, *settings), capture_output=True, text=True, cwd=tmp_path,
                            env=env_for(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    """One tiny run whose gate passes; shared by the end-to-end test and the browser checks."""
    tmp_path = tmp_path_factory.mktemp("learned")
    return tmp_path, dpoflow_run(tmp_path, *LEARNABLE)


@pytest.mark.slow
def test_local_runner_end_to_end_gate_pass_then_fail(learned_run):
    tmp_path, first = learned_run
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert set(summary["results"]) == {"beta-0.1", "beta-0.5"}
    resolved = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert resolved["config_hash"] == summary["config_hash"] and resolved["dpo"]["max_steps"] == 20
    for metrics in summary["results"].values():
        assert metrics["n_prompts"] == 24
        assert 0.0 <= metrics["win_rate_ci_low"] <= metrics["win_rate"] <= metrics["win_rate_ci_high"]
        assert {"kl", "reward_margin", "implicit_accuracy", "length_policy", "eval_set_hash"} <= set(metrics)
    # every task of the DAG ran through kfp's runner (the β tasks twice), and every step really ran
    tasks = [t["task"] for t in summary["tasks"]]
    assert set(tasks) == {"fingerprint", "data", "sft", "prefs", "reference", "dpo", "evaluate", "register", "select",
                          "gate", "promote"}
    assert all(t["status"] == "success" for t in summary["tasks"])
    assert {"data", "sft", "prefs", "reference", "dpo beta-0.1", "eval beta-0.5"} <= set(summary["timings_s"])
    assert all(seconds > 0 for seconds in summary["timings_s"].values())
    assert "task promote: success" in first.stdout and "win rate" in first.stdout
    assert "Executing task" not in first.stdout and "Executing task" in (tmp_path / "tiny" / "kfp.log").read_text()

    registry = summary["registry"]
    best = max(summary["results"].values(), key=lambda m: (m["win_rate_ci_low"], -m["kl"]))
    assert registry["gate"] == "pass" and set(registry["candidates"]) == {"beta-0.1", "beta-0.5"}
    assert registry["candidates"][f"beta-{best['beta']}"] == registry["selected_version"]
    assert registry["aliases"]["champion"] == registry["aliases"]["candidate"] == registry["selected_version"]
    _check_mlflow(tmp_path / "mlflow.db", summary)
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    champion = registry["selected_version"]

    # the same run again: every step reused, the same weights reuse their registered versions
    second = dpoflow_run(tmp_path, *LEARNABLE)
    assert second.stdout.count(": reused") == 8  # data sft prefs reference + 2x(dpo, eval)
    again = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert again["results"] == summary["results"] and again["registry"]["candidates"] == registry["candidates"]
    assert again["registry"]["gate"] == "fail" and "already the champion" in again["registry"]["gate_reasons"]

    # a worse challenger (other data, too few steps to learn) never becomes champion; reasons are tagged
    dpoflow_run(tmp_path, "run.name=weak", "data.demo.seed=1", "prefs.judge=callable:judges_for_tests:longer",
                "eval.judge=callable:judges_for_tests:longer", "registry.min_win_rate=0.55", "dpo.max_steps=2")
    weak = json.loads((tmp_path / "weak" / "summary.json").read_text())["registry"]
    assert weak["gate"] == "fail" and "fail: " in weak["gate_reasons"]
    assert weak["aliases"]["champion"] == champion

    # the champion loads back with plain transformers from the registry's artifacts and generates
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(MlflowClient().get_model_version_by_alias(MODEL, "champion").version) == champion
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}@champion", dst_path=str(tmp_path / "dl"))
    tokenizer, model = AutoTokenizer.from_pretrained(local), AutoModelForCausalLM.from_pretrained(local)
    ids = tokenizer("The movie was", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]


@pytest.mark.slow
def test_run_on_user_pairs_and_own_model_from_the_example_config(tmp_path, tiny_model_dir):
    """The path of a real user, from configs/examples/own_pairs_own_model.yaml: own preference pairs
    (some bad: quarantined, reported) and an own reference model in a folder; no SFT, no prefs."""
    from conftest import make_pairs

    frame = make_pairs(60).drop(columns=["prompt_messages"])
    rows = frame.to_dict(orient="records") + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))  # a JSON array, as exports often are
    settings = [f"data.source={tmp_path / 'pairs.json'}", f"model.base={tiny_model_dir}", "run.betas=[0.1]",
                "data.eval_fraction=0.3", "dpo.max_length=128", "dpo.max_steps=4", "dpo.per_device_batch_size=8",
                "dpo.gradient_accumulation_steps=1", "dpo.warmup_steps=0", "dpo.checkpoint_every=0",
                "eval.max_new_tokens=8", "eval.judge=callable:judges_for_tests:longer", f"run.output_dir={tmp_path}"]
    args = [str(Path(sys.executable).parent / "dpoflow"), "run", "-c",
            str(ROOT / "configs/examples/own_pairs_own_model.yaml")] + [f"--set={s}" for s in settings]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env_for(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "own-pairs" / "summary.json").read_text())
    metrics = summary["results"]["beta-0.1"]
    stats = json.loads((tmp_path / "own-pairs" / "data" / "stats.json").read_text())
    assert stats["rows_in"] == 61 and stats["kept"] == 60 and stats["quarantined"] == {"chosen_equals_rejected": 1}
    assert "data: 61 rows in, 60 kept, 1 quarantined (chosen_equals_rejected x1)" in result.stdout
    assert str(tmp_path / "own-pairs" / "data" / "quarantine.jsonl") in result.stdout
    held_out_prompts = stats["splits"]["prompts_eval"]
    assert metrics["n_prompts"] == held_out_prompts > 0 and metrics["n_eval_pairs"] == held_out_prompts
    assert not (tmp_path / "own-pairs" / "sft").exists() and not (tmp_path / "own-pairs" / "prefs").exists()
    assert summary["registry"]["candidates"] == {"beta-0.1": "1"}
    assert "WARNING: only" in (tmp_path / "own-pairs" / "kfp.log").read_text()  # ~18 prompts: a wide interval


def test_a_wrong_override_fails_the_first_task_naming_the_key(tmp_path):
    from dpoflow.config import ConfigError, load_config
    from dpoflow.pipeline.parameters import pipeline_arguments, resolve_config

    base = pipeline_arguments(load_config(ROOT / "params.yaml"))["config"]
    cfg = resolve_config(base, {"betas": [0.2, 0.4], "loss_type": "ipo", "base_model": ""},
                         '{"dpo.max_steps": 7}', ("", "", ""))
    assert cfg.run.betas == [0.2, 0.4] and cfg.dpo.loss_type == "ipo" and cfg.dpo.max_steps == 7
    assert cfg.model.base is None  # an empty parameter keeps the config's value
    with pytest.raises(ConfigError, match="dpo.max_stepz: unknown key"):
        resolve_config(base, {}, '{"dpo.max_stepz": 7}')
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        resolve_config(base, {"loss_type": "nope"})
    dvc = resolve_config(base, {"data_kind": "preferences", "judge": "llm"}, '{"prefs.enabled": false, '
                         '"sft.enabled": false, "model.base": "m"}', ("https://git.example/r.git", "pairs.jsonl", "v2"))
    assert dvc.data.dvc.repo == "https://git.example/r.git" and dvc.data.dvc.rev == "v2"


def test_an_edited_source_file_is_not_reused(tmp_path):
    from dpoflow.config import load_config
    from dpoflow.pipeline.reuse import content_fingerprint, data_fingerprint

    source = tmp_path / "pairs.jsonl"
    source.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    cfg = load_config(None, [f"data.source={source}"])
    before = data_fingerprint(cfg.data)
    source.write_text('{"prompt": "a", "chosen": "b", "rejected": "d"}\n')
    assert data_fingerprint(cfg.data) != before
    assert content_fingerprint("demo") is None
    assert content_fingerprint("models:/m@champion") != content_fingerprint("models:/m@champion")  # never reused


def _check_mlflow(db, summary):
    """The run is in a real sqlite MLflow store: params, lineage tags, dataset digest, nested β runs with
    per-step DPO metrics under TRL's names, the params a comparison needs, real durations."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("dpoflow")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.run_id == summary["mlflow_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.params["dpo.max_steps"] == "20" and parent.data.params["run.betas"] == "[0.1, 0.5]"
    assert parent.data.tags["dpoflow.config_hash"] == summary["config_hash"]
    md5 = summary["data"]["input_md5"]
    assert {d.dataset.digest for d in parent.inputs.dataset_inputs} == {md5[:36]}
    assert parent.info.end_time - parent.info.start_time > 10_000  # the whole pipeline, not a log-at-the-end
    for child in children:
        name = child.info.run_name
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.metrics["eval/win_rate"] == pytest.approx(summary["results"][name]["win_rate"])
        params = child.data.params
        assert params["dpo.beta"] == str(summary["results"][name]["beta"]) and params["dpo.loss_type"] == "sigmoid"
        assert params["dpo.learning_rate"] == "0.003" and params["dpo.max_steps"] == "20" and params["data.md5"] == md5
        assert child.data.tags["dpoflow.ref_cache_key"] and child.data.tags["dpoflow.data.md5"] == md5
        assert child.info.end_time - child.info.start_time > 2_000  # spans training and evaluation
        losses = client.get_metric_history(child.info.run_id, "loss")
        assert [m.step for m in losses] == [5, 10, 15, 20]  # dpo.log_every=5 in params.yaml
        assert "rewards/margins" in child.data.metrics
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"report.html", "metrics.json", "train_summary.json", "model"} <= artifacts
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 2
    for version in versions:
        tags = version.tags
        assert tags["dpoflow.data.md5"] == md5 and tags["dpoflow.config_hash"] == summary["config_hash"]
        assert float(tags["dpoflow.win_rate"]) == pytest.approx(summary["results"][f"beta-{tags['dpoflow.beta']}"]["win_rate"])
        assert {"dpoflow.git_sha", "dpoflow.ref_cache_key", "dpoflow.eval_set_hash", "dpoflow.kl",
                "dpoflow.win_rate_ci_low", "dpoflow.lib.torch", "dpoflow.lib.transformers"} <= set(tags)
    selected = client.get_model_version_by_alias(MODEL, "champion")
    assert selected.tags["dpoflow.gate"] == "pass" and "dpoflow.sweep" in selected.tags


@pytest.mark.slow
def test_pages_in_a_real_browser(learned_run):
    """The eval report, the frontier page and the MLflow UI's comparison of the β runs, opened in
    headless Chromium: no console errors, and the screenshots show the plots (asserted on pixels)."""
    require("" if shutil.which("chromium") else "chromium is not installed (.ci/run installs it: apt-get install chromium)")
    from mlflow import MlflowClient

    from browser import colored_pixels, screenshot
    from test_tracking import free_port, start_server, stop_server

    tmp_path, _ = learned_run
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    report = screenshot((tmp_path / "tiny" / "eval" / "beta-0.5" / "report.html").as_uri(), tmp_path / "report.png")
    assert report.errors == [] and colored_pixels(report.path, (31, 119, 180)) > 2000  # the win-rate bar
    frontier = screenshot((tmp_path / "tiny" / "frontier" / "frontier.html").as_uri(), tmp_path / "frontier.png")
    assert frontier.errors == [] and colored_pixels(frontier.path, (31, 119, 180)) > 100  # the frontier line

    port = free_port()
    server = start_server(tmp_path, port)  # an `mlflow server` over the run's own sqlite store
    try:
        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name("dpoflow").experiment_id
        children = [r.info.run_id for r in client.search_runs([experiment])
                    if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_run_id"]]
        assert len(children) == 2
        url = (f"http://127.0.0.1:{port}/#/compare-runs?runs={quote(json.dumps(children))}"
               f"&experiments={quote(json.dumps([experiment]))}")
        compare = screenshot(url, tmp_path / "compare.png", wait_ms=20000)
    finally:
        stop_server(server)
    assert compare.errors == []
    # the parallel-coordinates plot draws the runs as coloured lines (a blank or error page has none)
    assert colored_pixels(compare.path, (0, 0, 170), tolerance=90) + colored_pixels(compare.path, (170, 0, 0), 90) > 150
    assert "beta-0.1" in compare.dom and "beta-0.5" in compare.dom and "dpo.beta" in compare.dom


def test_a_cluster_run_without_a_tracking_server_is_refused(monkeypatch):
    """On a cluster (no local workspace) the default sqlite store would live and die inside each pod."""
    from dpoflow.config import ConfigError, load_config
    from dpoflow.pipeline.parameters import pipeline_arguments
    from dpoflow.pipeline.tasks import fingerprint_task

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = pipeline_arguments(load_config(ROOT / "params.yaml"))["config"]
    with pytest.raises(ConfigError, match="on a cluster, set the pipeline parameter mlflow_uri"):
        fingerprint_task(config=base, flat={}, config_overrides="{}", dvc=("", "", ""), workspace="", mlflow_uri="",
                         compiled_rounds=1, mlflow_run_id="")


# DPO long enough (200 steps a β, a checkpoint every 2) that a kill lands half-way wherever the poll wakes up
RESUMABLE = ["registry.enabled=false", "dpo.max_steps=200", "dpo.checkpoint_every=2"]


def like_a_terminal():
    """A shell starts its foreground job with SIGINT deliverable; pytest itself may have inherited it
    ignored (started in the background of a non-interactive shell) and would pass that on."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def ctrl_c_run(tmp_path_factory):
    """A run stopped by Ctrl-C (SIGINT to its process group, as a terminal sends it) once SFT is done,
    then started again to the end: (folder, the interrupted process, its stderr, the rerun). Its DPO
    ran uninterrupted: the killed runs below must end with its metrics."""
    tmp_path = tmp_path_factory.mktemp("ctrl_c")
    process = subprocess.Popen(run_args(tmp_path, *RESUMABLE), cwd=tmp_path, env=env_for(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=like_a_terminal)
    marker = tmp_path / "tiny" / ".steps" / "sft.json"
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert time.monotonic() < deadline and process.poll() is None, "sft never finished"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    return tmp_path, process, err, dpoflow_run(tmp_path, *RESUMABLE)


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_and_the_run_resumes(ctrl_c_run):
    """Ctrl-C: one line saying what is kept, exit 130, the MLflow parent marked KILLED; started again,
    the finished steps are reused."""
    tmp_path, process, err, again = ctrl_c_run
    assert process.returncode == 130, err[-2000:]
    assert "interrupted; finished steps are kept and reused, and training resumes from its last checkpoint" in err
    assert "Traceback" not in err
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dpoflow").experiment_id])
    killed, finished = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    assert killed.info.status == "KILLED" and finished.info.status == "FINISHED"
    assert "sft: reused" in again.stdout and "data: reused" in again.stdout


@pytest.mark.slow
def test_sigkill_half_way_then_rerun_gives_the_same_metrics(tmp_path, ctrl_c_run):
    """Killed (SIGKILL, no cleanup) while DPO trains, `dpoflow run` started again redoes only what did
    not finish — DPO from its last complete checkpoint — and ends with the metrics of a run whose DPO
    was not interrupted."""
    process = subprocess.Popen(run_args(tmp_path, *RESUMABLE), cwd=tmp_path, env=env_for(tmp_path),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "tiny" / "dpo"
    deadline = time.monotonic() + 600
    while not any(complete_checkpoint(c) for c in checkpoints.glob("beta-*.partial/checkpoints/step-*")):
        assert time.monotonic() < deadline and process.poll() is None, "the run never reached a DPO checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # the kill point: DPO had not finished (else the rerun would reuse it and prove nothing)
    assert not (tmp_path / "tiny" / "summary.json").exists()
    assert not all((checkpoints / f"beta-{b}" / "model").exists() for b in (0.1, 0.5))
    time.sleep(1)  # the task processes die with it (PR_SET_PDEATHSIG)
    log_before = len((tmp_path / "tiny" / "kfp.log").read_text())

    rerun = dpoflow_run(tmp_path, *RESUMABLE)
    assert "reference: reused" in rerun.stdout and "sft: reused" in rerun.stdout
    assert "dpo: resuming from step" in (tmp_path / "tiny" / "kfp.log").read_text()[log_before:]
    expected = json.loads((ctrl_c_run[0] / "tiny" / "summary.json").read_text())["results"]
    assert json.loads((tmp_path / "tiny" / "summary.json").read_text())["results"] == expected


@pytest.mark.slow
def test_an_injected_mlflow_run_and_edited_or_deleted_outputs(tmp_path):
    """MLFLOW_RUN_ID (what a KFP >= 2.17 server injects): the whole run tree goes under that run, which
    dpoflow leaves open for its owner. Then the SFT weights are edited and the reference cache
    deleted in place: a step reading them refuses, naming the file and the step that wrote it, and
    the next `dpoflow run` rebuilds exactly those steps (and what depends on them), reusing the rest."""
    from mlflow import MlflowClient

    from dpoflow.manifest import verify

    settings = ["registry.enabled=false", "run.betas=[0.1]"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    injected = client.create_run(client.create_experiment("kfp-owned")).info.run_id
    first = subprocess.run(run_args(tmp_path, *settings), capture_output=True, text=True, cwd=tmp_path,
                           env={**env_for(tmp_path), "MLFLOW_RUN_ID": injected})
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "tiny"
    assert json.loads((run / "summary.json").read_text())["mlflow_run_id"] == injected
    children = client.search_runs([client.get_run(injected).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{injected}'")
    assert {"beta-0.1"} <= {c.info.run_name for c in children}
    assert client.get_run(injected).info.status == "RUNNING"  # its owner (the KFP run) ends it

    weights = run / "sft" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    (run / "reference" / "reference_logps.parquet").unlink()
    refused = subprocess.run([str(Path(sys.executable).parent / "dpoflow"), "reference", "--pairs", str(run / "prefs"),
                              "--model", str(run / "sft" / "model"), "--out", str(tmp_path / "ref")],
                             capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 1
    assert "model.safetensors changed after step 'sft' wrote it" in refused.stderr

    again = dpoflow_run(tmp_path, *settings)
    log = (run / "kfp.log").read_text()
    assert "[sft] not reusable" in log and "model.safetensors changed after step 'sft' wrote it" in log
    assert "[reference] not reusable: tiny/reference/reference_logps.parquet is missing: step 'reference' wrote it" in log
    assert "data: reused" in again.stdout and "sft: reused" not in again.stdout
    for step in ("sft", "reference"):
        verify(run / step)
    assert (run / "reference" / "reference_logps.parquet").exists()


def test_a_pointer_artifact_carries_no_bytes_and_refuses_a_folder_rebuilt_since(tmp_path):
    """With a workspace (shared storage) a step's KFP artifact is a pointer to its folder: no model
    bytes in the artifact store. A reader gets the folder, and is refused (naming it) when another run
    has since rebuilt that folder into something else, or deleted it."""
    from types import SimpleNamespace

    from dpoflow.manifest import ManifestError, building
    from dpoflow.pipeline.reuse import LOCATION, path_of, point_to

    out = tmp_path / "workspace" / "sft"

    def build(text: str) -> None:
        with building("sft", out, config=text, inputs={}) as (work, _):
            (work / "model.safetensors").write_text(text * 1000)

    build("one")
    artifact = SimpleNamespace(path=str(tmp_path / "kfp" / "sft" / "reference_model"), metadata={})
    point_to(artifact, out)
    assert [p.name for p in Path(artifact.path).rglob("*")] == [LOCATION]
    assert artifact.metadata["location"] == str(out.resolve()) and len(artifact.metadata["manifest"]) == 16
    assert path_of(artifact, "model.safetensors").read_text() == "one" * 1000
    build("two")  # an overlapping run of the same workspace rebuilt the step
    with pytest.raises(ManifestError, match=f"{out} no longer holds the output"):
        path_of(artifact)
    shutil.rmtree(out)
    with pytest.raises(ManifestError, match=f"{out} is gone"):
        path_of(artifact)
