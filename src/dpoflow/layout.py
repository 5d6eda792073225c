"""Where a run's steps read and write, how they are named, and how many CPU threads each task takes:
shared by the CLI's single-step commands (the DVC stages) and the pipeline's tasks, so both write the
same folders with the same thread counts (CPU float reductions depend on them: `dpoflow run` and
`dvc repro` write the same bytes)."""

from __future__ import annotations

import os
from pathlib import Path

from dpoflow.config import Config

# where step outputs live between tasks (pipeline/dag.py): one shared volume, or KFP's artifacts
STORAGE = ("shared", "artifacts")


def beta_dir_name(beta: float) -> str:
    """`beta-0.1`, `beta-2.0`: the same names DVC's `foreach` gives the stages of dvc.yaml."""
    return f"beta-{beta}"


def round_rel(step: str, beta: float, round: int) -> str:
    """Workspace folder of a β step of on-policy round `round`: round 1 keeps the single-round names
    (dpo/beta-0.5, as dvc.yaml writes them); round r > 1 lives in round-<r>/beta-<β>/<step>."""
    if round == 1:
        return f"{step}/{beta_dir_name(beta)}"
    return f"round-{round}/{beta_dir_name(beta)}/{step}"


def round_step_name(step: str, beta: float, round: int) -> str:
    """`dpo beta-0.5` (round 1, as before rounds existed), `dpo round-2 beta-0.5`: log lines, .steps/ records."""
    return f"{step} {beta_dir_name(beta)}" if round == 1 else f"{step} round-{round} {beta_dir_name(beta)}"


def round_run_name(beta: float, round: int, rounds: int) -> str:
    """Name of the β run (MLflow, summary.json): beta-0.5, or round-2/beta-0.5 when there are rounds."""
    return beta_dir_name(beta) if rounds == 1 else f"round-{round}/{beta_dir_name(beta)}"


def step_dirs(cfg: Config) -> dict[str, Path]:
    """Where each step of a run reads and writes: <output_dir>/<run name>/<step> (as dvc.yaml says)."""
    root = Path(cfg.run.output_dir) / cfg.run.name
    pairs = root / "data" if cfg.data.kind == "preferences" else root / "prefs"
    reference_model = root / "sft" / "model" if cfg.sft.enabled else Path(cfg.model.base or root / "base")
    return {"root": root, "data": root / "data", "pairs": pairs, "reference_model": reference_model,
            "reference": root / "reference", "dpo": root / "dpo" / beta_dir_name(cfg.dpo.beta),
            "eval": root / "eval" / beta_dir_name(cfg.dpo.beta)}


def beta_threads(n_betas: int) -> int:
    """CPU threads of each β task: kfp's local runner runs two β iterations at once, so each gets half
    the cores. `dpoflow dpo`/`eval` (the DVC stages) use the same count: CPU float reductions depend
    on the thread count, and `dpoflow run` and `dvc repro` must write the same bytes."""
    return max(1, (os.cpu_count() or 1) // min(n_betas, 2))


def set_threads(threads: int) -> None:
    """Tasks that run side by side (the β loop) share the machine's cores instead of each taking all."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)

