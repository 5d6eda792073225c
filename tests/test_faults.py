"""Fault-injection suite (`pytest -m faults`, run in CI): every fault here is injected for real —
SIGKILL / SIGTERM to real processes, NaN in the loss, truncated checkpoints and Parquet files, a
writer that hits a full disk, concurrent runs on one project — and each test asserts what the README's
"Failure modes" table promises: what happens, and that nothing else is lost. (The MLflow server
killed mid-run is tests/test_tracking.py::test_live_metrics_and_a_server_restart_mid_run, also marked.)"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml

from conftest import assert_same_weights, complete_checkpoint, vouch, write_jsonl
from dpoflow.config import DataConfig, DpoConfig, ModelConfig, SftConfig
from dpoflow.data.sources import DataSourceError
from dpoflow.data.step import run_data
from dpoflow.dpo.reference import run_reference
from dpoflow.dpo.train import run_dpo
from dpoflow.manifest import ManifestError, verify
from dpoflow.sft import run_sft
from dpoflow.training import TrainingError

pytestmark = pytest.mark.faults
BIN = Path(sys.executable).parent


def _dpo_cfg(**kw):
    return DpoConfig(**{**dict(max_steps=8, per_device_batch_size=4, learning_rate=1e-3, max_length=64, log_every=1,
                               checkpoint_every=2, seed=3), **kw})


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, pairs_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("faults") / "reference"
    run_reference(pairs_dir, tiny_model_dir, out, max_length=64)
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory, pairs_dir, tiny_model_dir, reference_dir):
    """The uninterrupted DPO run every faulted run must end equal to."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    run_dpo(_dpo_cfg(), pairs_dir, tiny_model_dir, out, reference_dir=reference_dir)
    return out


def _wait_for(path: Path, timeout=120.0):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _dpo_command(tmp_path, out, pairs_dir, model_dir, reference_dir, **settings):
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({"dpo": _dpo_cfg(**settings).model_dump(mode="json")}))
    return [str(BIN / "dpoflow"), "dpo", "-c", str(config), "--pairs", str(pairs_dir), "--reference-model",
            str(model_dir), "--reference-dir", str(reference_dir), "--out", str(out)]


# --- processes killed ---------------------------------------------------------------------------------

def test_sigkill_during_dpo_then_rerun_resumes_to_the_same_weights(tmp_path, pairs_dir, tiny_model_dir, reference_dir):
    """`dpoflow dpo` SIGKILLed once a complete checkpoint >= step 8 is on disk: nothing half-written is
    visible, and the same command with --resume continues from that checkpoint to the uninterrupted
    run's weights, training record and per-step metrics."""
    out = tmp_path / "out"
    # 400 steps of milliseconds: the kill lands half-way wherever the poll wakes up (only the newest
    # checkpoints are kept: any complete one >= step 8 will do)
    command = _dpo_command(tmp_path, out, pairs_dir, tiny_model_dir, reference_dir, max_steps=400, checkpoint_every=4)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = out.with_name("out.partial") / "checkpoints"
    deadline = time.time() + 300
    while not any(int(p.name.split("-")[1]) >= 8 and complete_checkpoint(p) for p in checkpoints.glob("step-*")):
        assert time.time() < deadline and process.poll() is None, "no checkpoint >= step 8 appeared before the end"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL  # killed, not finished: the kill point
    assert not out.exists()  # nothing half-written is visible: no later step can take it
    with pytest.raises(ManifestError, match="does not exist|no MANIFEST"):
        verify(out)
    rerun = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "dpo: resuming from step" in rerun.stdout
    resumed_from = int(rerun.stdout.split("resuming from step ")[1].split()[0])
    assert resumed_from >= 8 and json.loads((out / "timing.json").read_text())["resumed_from"] == resumed_from
    expected = tmp_path / "expected"
    subprocess.run(_dpo_command(tmp_path, expected, pairs_dir, tiny_model_dir, reference_dir, max_steps=400,
                                checkpoint_every=4), check=True, capture_output=True)
    assert_same_weights(out, expected, atol=1e-6)
    # the training record is byte-identical to the uninterrupted run's, and every step is logged once
    assert (out / "train_summary.json").read_text() == (expected / "train_summary.json").read_text()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 401))
    verify(out)


@pytest.mark.parametrize("step", ["sft", "prefs", "eval"])
def test_sigkill_during_a_step_leaves_nothing_a_later_step_takes(tmp_path, demo_data, tiny_sft, step):
    """A step killed half-way, once it has written part of its output (sft: a checkpoint; prefs: its
    train split, while it samples the eval split; eval: while it generates): the half-written folder
    is never used, and the rerun makes it whole (sft resumes from its checkpoint)."""
    import psutil

    out = tmp_path / step
    partial = out.with_name(f"{step}.partial")
    args = {"sft": ["--set", "sft.max_steps=300", "--set", "model.preset=tiny", "--set", "model.vocab_size=400",
                    "--set", "sft.checkpoint_every=5", "--data", str(demo_data)],
            "prefs": ["--set", "prefs.max_prompts=16", "--set", "prefs.max_new_tokens=24", "--set",
                      "prefs.max_eval_prompts=400", "--data", str(demo_data), "--model", str(tiny_sft / "model")],
            "eval": ["--set", "eval.max_new_tokens=96", "--policy", str(tiny_sft / "model"), "--reference-model",
                     str(tiny_sft / "model"), "--data", str(demo_data)]}[step]
    command = [str(BIN / "dpoflow"), step, *args, "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)

    def written() -> bool:  # what the step has written so far, or (eval) CPU time spent inside its work
        if step == "sft":
            return any(partial.glob("checkpoints/step-*/trainer_state.json"))
        if step == "prefs":
            return (partial / "train.parquet").exists()
        return partial.exists() and sum(psutil.Process(process.pid).cpu_times()[:2]) > 6.0  # of ~20 s

    deadline = time.time() + 300
    while not written():
        assert process.poll() is None and time.time() < deadline, f"{step} ended before it had written anything"
        time.sleep(0.05)
    assert process.poll() is None, "the step finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() and partial.exists()
    if step == "prefs":  # what a later step does with the half-written folder (train.parquet, no eval): refuse it
        assert (partial / "train.parquet").exists() and not (partial / "eval.parquet").exists()
        refused = subprocess.run([str(BIN / "dpoflow"), "reference", "--pairs", str(partial),
                                  "--model", str(tiny_sft / "model"), "--out", str(tmp_path / "ref")],
                                 capture_output=True, text=True, cwd=tmp_path)
        assert refused.returncode == 1 and "no MANIFEST.json" in refused.stderr
    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    if step == "sft":
        assert "resuming from step" in rerun.stdout + rerun.stderr
    manifest = verify(out)
    assert {"sft": "model/model.safetensors", "prefs": "train.parquet", "eval": "metrics.json"}[step] in manifest["files"]


def test_sigterm_checkpoints_the_current_step_and_the_rerun_resumes(tmp_path, demo_data):
    """Pod preemption: SIGTERM lets SFT finish its step, checkpoint, and exit 143; nothing is lost."""
    sft = {"max_steps": 60, "per_device_batch_size": 8, "learning_rate": 3e-3, "max_length": 64, "log_every": 1,
           "checkpoint_every": 0}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sft": sft, "model": {"preset": "tiny", "vocab_size": 400}}))
    out = tmp_path / "sft"
    command = [str(BIN / "dpoflow"), "sft", "-c", str(config), "--data", str(demo_data), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out.with_name("sft.partial") / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-2000:]
    assert "terminated (SIGTERM) after step" in stderr and "checkpoint saved" in stderr
    step = int(stderr.split("after step ")[1].split(":")[0])
    assert (out.with_name("sft.partial") / "checkpoints" / f"step-{step}" / "trainer_state.json").exists()
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0 and f"sft: resuming from step {step}" in rerun.stdout
    expected = tmp_path / "expected"
    run_sft(SftConfig(**sft), ModelConfig(preset="tiny", vocab_size=400), demo_data, expected)
    assert_same_weights(out, expected, atol=1e-6)


def test_sigterm_stops_dpo_after_its_step_and_the_rerun_resumes_to_the_same_weights(tmp_path, pairs_dir,
                                                                                      tiny_model_dir, reference_dir):
    """The same for DPO: SIGTERM mid-run, exit 143 naming the step, its checkpoint on disk; the same
    command resumes there and ends on the weights of an uninterrupted run."""
    out = tmp_path / "out"
    command = _dpo_command(tmp_path, out, pairs_dir, tiny_model_dir, reference_dir, max_steps=300, checkpoint_every=0)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out.with_name("out.partial") / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-2000:]
    step = int(stderr.split("terminated (SIGTERM) after step ")[1].split(":")[0])
    assert 5 <= step < 300 and "checkpoint saved" in stderr
    assert (out.with_name("out.partial") / "checkpoints" / f"step-{step}" / "trainer_state.json").exists()
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0 and f"dpo: resuming from step {step}" in rerun.stdout, rerun.stderr[-2000:]
    expected = tmp_path / "expected"
    run_dpo(_dpo_cfg(max_steps=300, checkpoint_every=0), pairs_dir, tiny_model_dir, expected, reference_dir=reference_dir)
    assert_same_weights(out, expected, atol=1e-6)


@pytest.mark.slow
def test_sigterm_to_dpoflow_run_reaches_its_training_task_and_the_rerun_resumes(tmp_path):
    """`kill <pid of dpoflow run>` (only that process, as a scheduler stops a job): the run forwards
    SIGTERM to its tasks and waits; SFT finishes its step, checkpoints, exits; the run exits 143 and
    leaves no task process behind; started again, SFT resumes from that checkpoint."""
    import psutil

    from test_pipeline import env_for, run_args

    settings = ["registry.enabled=false", "sft.max_steps=120", "sft.log_every=1", "run.betas=[0.1]"]
    run = subprocess.Popen(run_args(tmp_path, *settings), cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / "tiny" / "sft.partial" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and run.poll() is None, "sft never started training"
        time.sleep(0.1)
    tasks = psutil.Process(run.pid).children(recursive=True)
    run.send_signal(signal.SIGTERM)  # to `dpoflow run` alone
    out, err = run.communicate(timeout=180)
    assert run.returncode == 143, err[-3000:]
    assert "dpoflow run: terminated (SIGTERM)" in err and "Traceback" not in err
    said = (tmp_path / "tiny" / "kfp.log").read_text()  # the tasks' own output
    step = int(said.split("sft: terminated (SIGTERM) after step ")[1].split(":")[0])
    assert (tmp_path / "tiny" / "sft.partial" / "checkpoints" / f"step-{step}" / "trainer_state.json").exists()
    assert not [t for t in tasks if t.is_running() and t.status() != psutil.STATUS_ZOMBIE]
    again = subprocess.run(run_args(tmp_path, *settings), cwd=tmp_path, env=env_for(tmp_path), capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"sft: resuming from step {step}" in (tmp_path / "tiny" / "kfp.log").read_text()


# --- numbers and files that go bad --------------------------------------------------------------------

def _nan_at(monkeypatch, call: int):
    """The loss of the `call`-th micro-batch becomes NaN (a diverging run, a bad batch)."""
    import dpoflow.dpo.train as train

    original, calls = train.preference_loss, []

    def poisoned(*args, **kwargs):
        losses, chosen, rejected = original(*args, **kwargs)
        calls.append(1)
        return (losses * float("nan") if len(calls) == call else losses), chosen, rejected

    monkeypatch.setattr(train, "preference_loss", poisoned)


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, pairs_dir,
                                                                        tiny_model_dir, reference_dir, straight):
    out = tmp_path / "out"
    _nan_at(monkeypatch, 5)
    with pytest.raises(TrainingError, match=r"dpo: step 5: the loss is nan; training stopped at this step .* "
                                            r"last good checkpoint \S+step-4 is kept"):
        run_dpo(_dpo_cfg(), pairs_dir, tiny_model_dir, out, reference_dir=reference_dir)
    partial = out.with_name("out.partial")
    assert not out.exists() and not (partial / "checkpoints" / "step-6").exists()
    assert [json.loads(line)["step"] for line in (partial / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    monkeypatch.undo()  # the cause fixed: the same command resumes from the kept checkpoint
    said = []
    run_dpo(_dpo_cfg(), pairs_dir, tiny_model_dir, out, reference_dir=reference_dir, log=said.append)
    assert "dpo: resuming from step 4" in said
    assert_same_weights(out, straight, atol=1e-6)


@pytest.mark.parametrize("step", ["dpo", "sft"])
def test_a_nan_gradient_with_a_finite_loss_stops_at_that_step(tmp_path, monkeypatch, pairs_dir, tiny_model_dir,
                                                              reference_dir, demo_data, step):
    """A gradient that turns NaN while the loss stays finite (an overflow in the backward): DPO and
    SFT stop at that step before the update, name the first bad parameter and keep the last good
    checkpoint; nothing of the bad step is written."""
    import accelerate

    original, calls = accelerate.Accelerator.backward, []

    def poisoned(self, loss, **kwargs):
        original(self, loss, **kwargs)
        calls.append(1)
        if len(calls) == 5:  # one backward per step here: step 5's gradient
            _, parameter = next(self._models[0].named_parameters())
            parameter.grad.fill_(float("nan"))

    monkeypatch.setattr(accelerate.Accelerator, "backward", poisoned)
    out = tmp_path / step
    with pytest.raises(TrainingError, match=rf"{step}: step 5: the gradient norm is nan \(first non-finite gradient: "
                                            rf"\S*embed_tokens.weight\); .* last good checkpoint \S+step-4 is kept"):
        if step == "dpo":
            run_dpo(_dpo_cfg(), pairs_dir, tiny_model_dir, out, reference_dir=reference_dir)
        else:
            run_sft(SftConfig(max_steps=8, per_device_batch_size=8, max_length=64, log_every=1, checkpoint_every=2),
                    ModelConfig(preset="tiny", vocab_size=400), demo_data, out)
    partial = out.with_name(f"{step}.partial")
    assert not out.exists() and sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert [json.loads(line)["step"] for line in (partial / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)] == [1, 2, 3, 4]


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path, monkeypatch, pairs_dir, tiny_model_dir,
                                                                    reference_dir, straight):
    out = tmp_path / "out"
    _nan_at(monkeypatch, 7)  # stops after the checkpoints of steps 4 and 6
    with pytest.raises(TrainingError):
        run_dpo(_dpo_cfg(), pairs_dir, tiny_model_dir, out, reference_dir=reference_dir)
    monkeypatch.undo()
    newest = out.with_name("out.partial") / "checkpoints" / "step-6"
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != "trainer_state.json"),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    said = []
    run_dpo(_dpo_cfg(), pairs_dir, tiny_model_dir, out, reference_dir=reference_dir, log=said.append)
    assert any("step-6 is unusable" in line and "does not match its checksum" in line for line in said)
    assert "dpo: resuming from step 4" in said
    assert_same_weights(out, straight, atol=1e-6)


def test_truncated_parquet_is_refused_naming_the_file(tmp_path, pairs_dir, tiny_model_dir, reference_dir):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for name in ("train.parquet", "eval.parquet"):
        (pairs / name).write_bytes((pairs_dir / name).read_bytes())
    vouch(pairs)
    train = pairs / "train.parquet"
    train.write_bytes(train.read_bytes()[:-100])
    with pytest.raises(ManifestError, match=r"train.parquet changed after step .* truncated or corrupted"):
        run_dpo(_dpo_cfg(), pairs, tiny_model_dir, tmp_path / "out", reference_dir=reference_dir)
    # a truncated source file: the data step names it
    source = tmp_path / "pairs_source.parquet"
    pd.read_parquet(pairs_dir / "train.parquet").to_parquet(source)
    source.write_bytes(source.read_bytes()[:-200])
    with pytest.raises(DataSourceError, match=r"pairs_source.parquet: cannot be read as parquet .* truncated"):
        run_data(DataConfig(kind="preferences", source=str(source)), tmp_path / "data")


def test_disk_full_keeps_the_previous_output_whole(tmp_path, monkeypatch):
    """A writer that hits ENOSPC half-way: the step fails with the OS error, the previous output stays
    exactly as it was (manifest intact), nothing half-written takes its place."""
    out = tmp_path / "data"
    cfg = DataConfig(demo={"n_reviews": 200})
    run_data(cfg, out)
    before = json.loads((out / "MANIFEST.json").read_text())
    writes = []
    original = pd.DataFrame.to_parquet

    def full_disk(self, path, *args, **kwargs):
        writes.append(path)
        if len(writes) == 2:
            Path(path).write_bytes(b"PAR1 half")  # a partial file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        run_data(DataConfig(demo={"n_reviews": 200, "seed": 1}), out)
    assert verify(out) == before  # the old output, whole
    monkeypatch.undo()
    run_data(DataConfig(demo={"n_reviews": 200, "seed": 1}), out)  # space again: the new one replaces it
    assert verify(out)["key"] != before["key"]


# --- concurrency ----------------------------------------------------------------------------------------

def test_second_writer_of_a_step_folder_is_refused_with_the_first_ones_pid(tmp_path, pairs_dir, tiny_model_dir,
                                                                        reference_dir):
    out = tmp_path / "out"
    partial = out.with_name("out.partial")
    # a first writer that cannot finish while this test looks (it is stopped with SIGTERM below)
    command = _dpo_command(tmp_path, out, pairs_dir, tiny_model_dir, reference_dir, max_steps=100_000, checkpoint_every=0)
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(partial / "metrics.jsonl")
    second = subprocess.run(command, capture_output=True, text=True)
    assert first.poll() is None  # the first writer held the folder all the while
    assert second.returncode == 1
    assert f"step dpo writing {out} is already running (pid {first.pid})" in second.stderr
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr[-2000:]
    # the refused writer touched nothing: the first one's checkpoint is whole, to resume from
    step = int(stderr.split("terminated (SIGTERM) after step ")[1].split(":")[0])
    assert complete_checkpoint(partial / "checkpoints" / f"step-{step}") and not out.exists()


def test_a_shared_reference_cache_entry_appears_whole_or_not_at_all(tmp_path, pairs_dir, tiny_model_dir):
    """Four runs compute the same reference log-probs at once into one shared cache, beside the
    leftover of a writer killed while staging its entry (a truncated file in `<key>.<pid>.tmp`): all
    four finish with identical results, the cache holds exactly one whole entry, and the leftover is
    never taken for it; a later run hits the entry."""
    from dpoflow.dpo.reference import cache_key, load_pair_frames

    cache = tmp_path / "cache"
    key = cache_key(load_pair_frames(pairs_dir), tiny_model_dir, 64, "keep_start")
    leftover = cache / f"{key}.4242.tmp"
    leftover.mkdir(parents=True)
    (leftover / "reference_logps.parquet").write_bytes(b"PAR1 truncated")

    def command(n):
        return [str(BIN / "dpoflow"), "reference", "--pairs", str(pairs_dir), "--model", str(tiny_model_dir),
                "--out", str(tmp_path / f"out{n}"), "--cache-dir", str(cache), "--set", "dpo.max_length=64"]

    runs = [subprocess.Popen(command(n), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(4)]
    results = [(run.wait(), run.stdout.read(), run.stderr.read()) for run in runs]
    assert [code for code, _, _ in results] == [0, 0, 0, 0], [err[-1500:] for _, _, err in results]
    assert sorted(p.name for p in cache.iterdir()) == sorted([key, leftover.name])
    entry = (cache / key / "reference_logps.parquet").read_bytes()
    assert pd.read_parquet(cache / key / "reference_logps.parquet").shape[0] > 0
    for n in range(4):
        verify(tmp_path / f"out{n}")
        assert (tmp_path / f"out{n}" / "reference_logps.parquet").read_bytes() == entry
    later = subprocess.run(command(4), capture_output=True, text=True)
    assert later.returncode == 0 and f"reference: cache hit {key}" in later.stdout


# --- helpers for the CLI-level faults -------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "data"
    run_data(DataConfig(demo={"n_reviews": 600}, eval_fraction=0.2), out)
    return out


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory, demo_data):
    out = tmp_path_factory.mktemp("faults") / "sft"
    run_sft(SftConfig(max_steps=10, per_device_batch_size=8, max_length=64), ModelConfig(preset="tiny", vocab_size=400),
            demo_data, out)
    return out



# --- secrets --------------------------------------------------------------------------------------------

SECRET = "sk-dpoflowtest0123456789abcdef"
PASSWORD = "hunter2-dpoflow-pass"


def test_a_credential_in_the_config_is_refused_without_echoing_it(tmp_path):
    result = subprocess.run([str(BIN / "dpoflow"), "config", "show", "--set",
                             f"eval.llm_judge.base_url=http://judge:{PASSWORD}@localhost:9/v1"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "eval.llm_judge.base_url holds what looks like a credential" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_masking_survives_another_thread_changing_the_environment():
    """Seen in CI: MLflow's telemetry thread deleted an environment variable while a DPO task logged
    its params, and iterating os.environ for the secrets to mask raised KeyError (the task failed).
    A thread setting and deleting a variable as fast as it can: 3000 maskings, none fails (before the
    fix about a quarter raised KeyError)."""
    import threading

    from dpoflow.redact import redact

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            os.environ["DPOFLOW_TEST_CHURN"] = "x"
            os.environ.pop("DPOFLOW_TEST_CHURN", None)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        masked = [redact("key sk-abcdefghijklmnopqrstuvwxyz0123") for _ in range(3000)]
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert set(masked) == {"key ***"}


@pytest.fixture(scope="module")
def concurrent_runs(tmp_path_factory):
    """Two `dpoflow run` of one project at once, logging into one sqlite MLflow store, and a third
    started with the first one's name while it runs. The first ('tiny') is careless with credentials:
    its judge prints the API key (as a real client's debug output might) and an MLflow password is
    set in its environment."""
    from test_pipeline import env_for, run_args

    tmp_path = tmp_path_factory.mktemp("concurrent")
    env = {**env_for(tmp_path), "OPENAI_API_KEY": SECRET, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    leaky = ["run.betas=[0.5]", "prefs.judge=callable:judges_for_tests:leaky",
             "eval.judge=callable:judges_for_tests:leaky", "registry.min_win_rate=0.0"]
    first = subprocess.Popen(run_args(tmp_path, *leaky), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path, env=env)
    _wait_for(tmp_path / "tiny" / "kfp.log")
    same = subprocess.run(run_args(tmp_path, *leaky), capture_output=True, text=True, cwd=tmp_path, env=env)
    first_still_running = first.poll() is None  # (a tiny run takes a minute or more: this is never the end)
    other = subprocess.run(run_args(tmp_path, "run.betas=[0.5]", "tracking.system_metrics=false", "run.name=other"),
                           capture_output=True, text=True, cwd=tmp_path, env=env_for(tmp_path))
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0 and other.returncode == 0, err[-2000:] + other.stderr[-2000:]
    return SimpleNamespace(path=tmp_path, env=env, first=first, out=out, err=err, same=same, other=other,
                           first_still_running=first_still_running)


@pytest.mark.slow
def test_secrets_in_the_environment_reach_no_record(concurrent_runs):
    """The careless run: neither the key nor the password appears in MLflow (params, tags, registry
    tags, artifacts), the runner log, the terminal, summary/config files, the reports or the compiled
    pipeline."""
    from test_pipeline import MODEL

    tmp_path, env = concurrent_runs.path, concurrent_runs.env
    log = (tmp_path / "tiny" / "kfp.log").read_text()
    assert "judge: calling the API with key ***" in log  # the judge did print it: masked
    compiled = tmp_path / "compiled"
    subprocess.run([str(BIN / "dpoflow"), "compile", "--root", str(compiled)], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    records = [concurrent_runs.out, concurrent_runs.err, concurrent_runs.same.stdout, concurrent_runs.same.stderr]
    for path in [*(tmp_path / "tiny").rglob("*"), *(tmp_path / "mlartifacts").rglob("*"), *compiled.rglob("*")]:
        if path.is_file() and path.suffix in (".json", ".jsonl", ".log", ".html", ".yaml", ".txt", ".md"):
            records.append(path.read_text(errors="replace"))
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    for run in mlflow.search_runs(experiment_names=["dpoflow"], output_format="list"):
        records += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    records += [json.dumps(v.tags) for v in client.search_model_versions(f"name = '{MODEL}'")]
    assert len(records) > 20
    for text in records:
        assert SECRET not in text and PASSWORD not in text


# --- bad input: a clear error naming what and where, nothing lost ---------------------------------------

BAD_ROWS = {  # one row per quarantine reason (data.kind=preferences)
    "malformed_json": b'{"prompt": "a", "chosen": \n',
    "undecodable_bytes": b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}\n',
    "missing_field": {"prompt": "q1", "chosen": "good"},
    "null_value": {"prompt": "q2", "chosen": None, "rejected": "bad"},
    "wrong_type": {"prompt": "q3", "chosen": 5, "rejected": "bad"},
    "empty_text": {"prompt": "q4", "chosen": "   ", "rejected": "bad"},
    "unencodable_text": {"prompt": "q5", "chosen": "good \ud800", "rejected": "bad"},
    "chosen_equals_rejected": {"prompt": "q6", "chosen": "same", "rejected": "same "},
    "duplicate_pair": {"prompt": "q0", "chosen": "good 0", "rejected": "bad 0"},
    "bad_role": {"chosen": [{"role": "wizard", "content": "hi"}], "rejected": [{"role": "user", "content": "x"}]},
    "bad_role_order": {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": [{"role": "user", "content": "a"}],
                       "rejected": [{"role": "assistant", "content": "b"}]},
    "no_common_prompt": {"chosen": "Human: one\n\nAssistant: a", "rejected": "Human: two\n\nAssistant: b"},
    "prompt_too_long": {"prompt": "word " * 400, "chosen": "good", "rejected": "bad"},
}


def test_every_bad_row_reason_is_quarantined_with_its_row(tmp_path):
    good = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]
    source = write_jsonl(tmp_path / "pairs.jsonl", [*good, *BAD_ROWS.values()])
    result = run_data(DataConfig(kind="preferences", source=str(source), mode="quarantine", max_prompt_tokens=100),
                      tmp_path / "data")
    quarantined = [json.loads(line) for line in (tmp_path / "data" / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["reason"] for q in quarantined) == sorted(BAD_ROWS)
    assert result.stats["rows_in"] == len(good) + len(BAD_ROWS) == result.stats["kept"] + len(quarantined)
    for q in quarantined:  # each names its line and keeps what it held
        assert q["row"] > len(good) and q["detail"] and ("raw_text" in q or "record" in q)
    verify(tmp_path / "data")  # the quarantine file is part of the verified output


def test_bad_models_configs_and_splits_are_named_with_the_fix(tmp_path, tiny_model_dir):
    from dpoflow.config import ConfigError, load_config
    from dpoflow.modeling import ModelLoadError, load_model, load_tokenizer

    (tmp_path / "params.yaml").write_text("run: [unclosed\n  name: x: y\n")
    with pytest.raises(ConfigError, match=r"params.yaml is not valid YAML \(line 2, column 7\)"):
        load_config(tmp_path / "params.yaml")
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no model weights .* save_pretrained"):
        load_model(str(empty))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights .* model.allow_pickle"):
        load_model(str(pickled))
    no_eos = tmp_path / "no_eos"
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.eos_token = None
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_eos)
    with pytest.raises(ModelLoadError, match="has no eos_token: completions could never end"):
        load_tokenizer(str(no_eos))
    no_pad = tmp_path / "no_pad"
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_pad)
    assert load_tokenizer(str(no_pad)).pad_token == tokenizer.eos_token  # padding is masked by length
    from dpoflow.config import Config, check_pipeline

    with pytest.raises(ConfigError, match=r"data.eval_fraction=0 holds out no prompts.* set data.eval_fraction above 0"):
        check_pipeline(Config.model_validate({"data": {"eval_fraction": 0.0}}))
    from dpoflow.config import EvalConfig
    from dpoflow.evaluation.evaluate import run_eval

    data = tmp_path / "d"
    run_data(DataConfig(demo={"n_reviews": 100}, eval_fraction=0.0), data)  # a data step alone may hold none out
    with pytest.raises(ValueError, match="holds no held-out prompts, so there is nothing to evaluate on"):
        run_eval(EvalConfig(judge="callable:judges_for_tests:longer"), tiny_model_dir, tiny_model_dir, data,
                 tmp_path / "e", beta=0.1)


def test_a_judge_that_raises_or_returns_nan_names_itself_the_item_and_the_fix(tmp_path, demo_data, tiny_sft):
    from dpoflow.config import PrefsConfig
    from dpoflow.evaluation.judges import JudgeError
    from dpoflow.preferences import run_prefs

    cfg = PrefsConfig(judge="callable:judges_for_tests:broken", max_prompts=4, max_eval_prompts=2, max_new_tokens=8)
    with pytest.raises(JudgeError, match=r"judge callable:judges_for_tests:broken raised ZeroDivisionError: .* on item "
                                         r"2 .* fix the judge"):
        run_prefs(cfg, demo_data, tiny_sft / "model", tmp_path / "prefs")
    assert not (tmp_path / "prefs").exists()
    # a judge that returns NaN: refused at that item (a NaN score would sort as neither better nor worse)
    cfg = PrefsConfig(judge="callable:judges_for_tests:not_a_number", max_prompts=4, max_eval_prompts=2,
                      max_new_tokens=8)
    with pytest.raises(JudgeError, match=r"judge callable:judges_for_tests:not_a_number returned nan on item 1 .* a "
                                         r"judge must return a finite number"):
        run_prefs(cfg, demo_data, tiny_sft / "model", tmp_path / "prefs")
    assert not (tmp_path / "prefs").exists()


UNICODE = ["Ein schöner Film, très émouvant — ¡qué bueno!", "Η ταινία ήταν υπέροχη και συγκινητική",
           "Фильм был прекрасный и трогательный", "الفيلم كان رائعا ومؤثرا جدا", "הסרט היה נפלא ומרגש",
           "फ़िल्म बहुत अच्छी और भावुक थी", "ภาพยนตร์เรื่องนี้ดีมากและซาบซึ้ง", "这部电影非常好看，很感人",
           "この映画はとても良くて感動的でした", "이 영화는 정말 좋고 감동적이었어요", "Great film 🎬🍿 👩🏽‍🚀 ❤️‍🔥 10/10",
           "<script>alert('x')</script> & \"quotes\" Zalgo t̷e̷x̷t"]  # its prompt is the first eval prompt


def test_unicode_of_every_script_survives_data_training_and_the_report(tmp_path):
    """Every script, RTL text, emoji with ZWJ and skin tones, combining marks and HTML-looking text: kept
    by the data step, encoded and decoded exactly, trained on, sampled, judged and shown escaped."""
    from dpoflow.config import EvalConfig, PrefsConfig
    from dpoflow.evaluation.evaluate import run_eval
    from dpoflow.preferences import run_prefs

    rows = [{"text": f"{text} {i}"} for i in range(12) for text in UNICODE]
    data = tmp_path / "data"
    run_data(DataConfig(kind="sft", source=str(write_jsonl(tmp_path / "corpus.jsonl", rows)), eval_fraction=0.25,
                        prompt_words=(2, 4)), data)
    sft = tmp_path / "sft"
    run_sft(SftConfig(max_steps=20, per_device_batch_size=8, max_length=64), ModelConfig(preset="tiny", vocab_size=600),
            data, sft)
    from dpoflow.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(sft / "model"))
    for text in UNICODE:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    judge = "callable:judges_for_tests:longer"
    run_prefs(PrefsConfig(judge=judge, k=3, max_new_tokens=12, min_gap=0.0), data, sft / "model", tmp_path / "prefs")
    run_reference(tmp_path / "prefs", sft / "model", tmp_path / "reference", max_length=64)
    run_dpo(_dpo_cfg(max_steps=4, checkpoint_every=0), tmp_path / "prefs", sft / "model", tmp_path / "dpo",
            reference_dir=tmp_path / "reference")
    metrics = run_eval(EvalConfig(judge=judge, max_new_tokens=12), tmp_path / "dpo" / "model", sft / "model", data,
                       tmp_path / "eval", beta=0.1, pairs_dir=tmp_path / "prefs", max_length=64)
    assert metrics["n_prompts"] > 0
    samples = pd.read_parquet(tmp_path / "eval" / "samples.parquet")
    prompts = set(pd.read_parquet(data / "prompts_eval.parquet").prompt)
    assert set(samples.prompt) <= prompts and any(not p.isascii() for p in samples.prompt)
    report = (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    import html

    # the HTML-looking prompt is among the report's examples, shown escaped, never as markup
    assert samples.prompt.iloc[0].startswith("<script>alert('x')</script> &")
    assert "<meta charset='utf-8'>" in report and "<script>alert" not in report
    assert html.escape("<script>alert('x')</script> &") in report
    assert sum(html.escape(p) in report for p in samples.prompt.head(5)) == min(5, len(samples))


@pytest.mark.slow
def test_concurrent_runs_one_name_refused_other_names_both_finish(concurrent_runs):
    """The same run name is refused with the first one's pid; another name runs alongside, both
    logging into one sqlite MLflow store."""
    tmp_path, same = concurrent_runs.path, concurrent_runs.same
    assert concurrent_runs.first_still_running
    assert same.returncode == 1
    assert f"run 'tiny' in {tmp_path} is already running (pid {concurrent_runs.first.pid})" in same.stderr
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents = {r.info.run_name: r.info.status for r in mlflow.search_runs(experiment_names=["dpoflow"],
                                                                          output_format="list")
               if "mlflow.parentRunId" not in r.data.tags}
    assert parents == {"tiny": "FINISHED", "other": "FINISHED"}
    for name in ("tiny", "other"):
        assert json.loads((tmp_path / name / "summary.json").read_text())["results"]["beta-0.5"]["n_prompts"] == 24
        verify(tmp_path / name / "dpo" / "beta-0.5")
