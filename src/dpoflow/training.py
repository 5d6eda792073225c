"""Machinery shared by the SFT and DPO loops: accelerator, optimizer, schedule, data order,
checkpoints and metrics. The loops themselves live in sft.py and dpo/train.py.

Exact resume: the data order is a pure function of (seed, epoch), so the position in the data is
derived from the optimizer step; `accelerator.save_state` stores model, optimizer, scheduler and RNG
states. A resumed run therefore replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from dpoflow.config import OptimConfig
from dpoflow.manifest import file_digest

STATE_FILE = "trainer_state.json"


def make_accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # a step is one run; forget precision settings left by an earlier Accelerator in this process
    # (e.g. a TRL trainer in the same test session). The process-group state is kept.
    AcceleratorState._reset_state()
    cuda = torch.cuda.is_available()
    mixed = "bf16" if precision == "bf16" or (precision == "auto" and cuda) else "no"
    # the schedule is over optimizer steps: by default a prepared scheduler steps once per process
    # (accelerate assumes each process's loader covers 1/N of an epoch), which with N processes
    # would warm up in 1/N of the steps and decay N times as fast
    return Accelerator(cpu=not cuda, mixed_precision=mixed, step_scheduler_with_optimizer=False)


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "rmsprop":  # the DPO paper's choice
        return torch.optim.RMSprop(params, lr=cfg.learning_rate)
    # fused (CPU and GPU kernels): one kernel per parameter with no temporaries; the loop
    # implementation (CPU's default) allocates two parameter-sized temporaries for sqrt(v) / c, which
    # set the step's peak memory at 152k vocabulary rows (the tied embedding alone is 545 MB for a
    # 0.5B model). The parameters are still on the CPU here: accelerate moves them after.
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)


def make_scheduler(optimizer, cfg: OptimConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def global_batch_indices(n_items: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Indices of the examples of optimizer step `step` (0-based): a seeded permutation per epoch.

    Drops the last incomplete global batch of an epoch so every step has the same size (the
    invariance batch 8 x GAS 1 == batch 4 x GAS 2 == 2 ranks x batch 4 depends on it).
    """
    if n_items < global_batch:
        raise ValueError(f"{n_items} examples are fewer than one global batch of {global_batch}; lower the batch size")
    steps_per_epoch = n_items // global_batch
    epoch, offset = divmod(step, steps_per_epoch)
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return order[offset * global_batch : (offset + 1) * global_batch]


def micro_batches(indices: list[int], rank: int, world: int, per_device: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: rank r takes a contiguous share, then splits it."""
    size = len(indices) // world
    share = indices[rank * size : (rank + 1) * size]
    return [share[i : i + per_device] for i in range(0, len(share), per_device)]


class TrainingError(RuntimeError):
    """Training stopped on purpose: a non-finite loss or gradient, or a preemption (SIGTERM)."""


def _checkpoint_files(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def checkpoint_problem(path: Path) -> str:
    """'' when the checkpoint is complete and every file matches the checksum saved with it."""
    if not (path / STATE_FILE).exists():
        return "incomplete (its save was interrupted)"
    state = json.loads((path / STATE_FILE).read_text())
    for name, expected in state.get("sha256", {}).items():
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        if file_digest(file) != expected:
            return f"{name} does not match its checksum (truncated or corrupted)"
    return ""


def latest_checkpoint(out_dir: Path, log=print) -> Path | None:
    """The newest checkpoint that is complete and matches its checksums; a damaged newer one is
    skipped, saying so."""
    checkpoints = sorted((out_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if not problem:
            return path
        log(f"checkpoint {path} is unusable: {problem}; trying the one before")
    return None


def save_checkpoint(accelerator, out_dir: Path, step: int, keep: int = 2) -> None:
    path = out_dir / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # written last, with the checksums: a killed save is never used
        (path / STATE_FILE).write_text(json.dumps({"step": step, "sha256": _checkpoint_files(path)}) + "\n")
        for old in sorted((out_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume_step(accelerator, out_dir: Path, log=print) -> int:
    """Load the latest sound checkpoint into the prepared objects; return its step (0 if none)."""
    checkpoint = latest_checkpoint(out_dir, log)
    if checkpoint is None:
        return 0
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / STATE_FILE).read_text())["step"]


@contextmanager
def sigterm_restored():
    """Whatever a training loop does to SIGTERM (see Guard) is undone when it ends, even by an error."""
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Guard:
    """What a training loop checks after every optimizer step:
    - SIGTERM (a preempted pod, `kill`, a terminated `dpoflow run`): the loop finishes its step, saves
      a checkpoint and stops with TrainingError; started again, the step resumes from it;
    - a non-finite loss or gradient: the loop stops at that step, naming the tensor and the last
      good checkpoint (kept; nothing after it is saved)."""

    def __init__(self, accelerator, out_dir: Path, name: str):
        self.accelerator, self.out_dir, self.name, self.stop = accelerator, out_dir, name, False
        if threading.current_thread() is threading.main_thread():  # undone by sigterm_restored()
            signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, signum, frame) -> None:
        self.stop = True

    def check_finite(self, step: int, loss: torch.Tensor, grad_norm, parameters) -> None:
        """Before optimizer step `step` (1-based) is applied: its loss and gradients."""
        if not math.isfinite(float(grad_norm)) or not bool(torch.isfinite(loss).all()):
            if not bool(torch.isfinite(loss).all()):
                what = f"the loss is {loss.flatten()[~torch.isfinite(loss.flatten())][0].item()}"
            else:
                bad = next((n for n, p in parameters if p.grad is not None and not torch.isfinite(p.grad).all()), "?")
                what = f"the gradient norm is {float(grad_norm)} (first non-finite gradient: {bad})"
            last = latest_checkpoint(self.out_dir, log=lambda _: None)
            kept = f"the last good checkpoint {last} is kept" if last else (
                f"no checkpoint was saved before it (set {self.name}.checkpoint_every)")
            raise TrainingError(f"{self.name}: step {step}: {what}; training stopped at this step and nothing after "
                                f"it was saved; {kept}. Lower {self.name}.learning_rate or {self.name}.max_grad_norm, "
                                "check the data, or use precision fp32; a start with other settings begins afresh")

    def check_stop(self, step: int) -> None:
        """After optimizer step `step` (1-based): stop here, checkpointed, if SIGTERM arrived."""
        stop = torch.tensor(float(self.stop), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:  # one preempted rank stops them all at the same step
            stop = self.accelerator.reduce(stop, "max")
        if stop.item():
            save_checkpoint(self.accelerator, self.out_dir, step, keep=3)
            raise TrainingError(f"{self.name}: terminated (SIGTERM) after step {step}: checkpoint saved in "
                                f"{self.out_dir / 'checkpoints' / f'step-{step}'}; start the same command again to "
                                "resume from it")


def write_summary(out_dir: Path, summary: dict, timing: dict) -> dict:
    """train_summary.json holds results only (deterministic: byte-identical on a rerun, so DVC sees an
    unchanged output); timing.json holds how this run went (seconds, throughput, resume point) and
    is excluded from DVC outputs by .dvcignore. Returns both merged."""
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return {**summary, **timing}


class MetricsWriter:
    """Appends one JSON line per logged step to metrics.jsonl and forwards to an optional callback."""

    def __init__(self, path: Path, enabled: bool, callback=None, resume_from: int = 0):
        self.path, self.enabled, self.callback = path, enabled, callback
        if enabled and path.exists():  # keep lines up to the resumed step (none for a fresh run)
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_from]
            path.write_text("".join(line + "\n" for line in kept))

    def __call__(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: round(float(v), 8) for k, v in metrics.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.callback:
            self.callback(step, metrics)
