"""`dpoflow run`: the whole pipeline in this process, step after step, from one config.

Each step writes to <output_dir>/<run name>/<step>. A step whose inputs are unchanged (same config
section hash, same upstream fingerprints) is reused: its `step.json` records the key it was built
with. (A later issue moves this onto the Kubeflow local runner without changing what it produces.)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from dpoflow.config import Config, config_dict


def code_hash() -> str:
    """Hash of dpoflow's own source: a code change invalidates reused step outputs."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _step_key(*parts) -> str:
    return hashlib.sha256(json.dumps([code_hash(), *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_step(name: str, out_dir: Path, key: str, fn: Callable[[], object], log=print) -> tuple[bool, float]:
    """Run `fn` unless out_dir holds a finished output built with the same key. Returns (reused, seconds)."""
    marker = out_dir / "step.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        log(f"[{name}] inputs unchanged, reusing {out_dir}")
        return True, 0.0
    marker.unlink(missing_ok=True)
    started = time.perf_counter()
    log(f"[{name}] running -> {out_dir}")
    fn()
    seconds = time.perf_counter() - started
    marker.write_text(json.dumps({"key": key, "seconds": round(seconds, 2)}) + "\n")
    return False, seconds


def step_dirs(cfg: Config) -> dict[str, Path]:
    """Where each step of a run reads and writes: <output_dir>/<run name>/<step>."""
    root = Path(cfg.run.output_dir) / cfg.run.name
    pairs = root / "data" if cfg.data.kind == "preferences" else root / "prefs"
    reference_model = root / "sft" / "model" if cfg.sft.enabled else Path(cfg.model.base or root / "base")
    return {"root": root, "data": root / "data", "pairs": pairs, "reference_model": reference_model,
            "reference": root / "reference"}


def run_pipeline(cfg: Config, log=print) -> dict:
    from dpoflow.data.step import run_data

    root = Path(cfg.run.output_dir) / cfg.run.name
    timings: dict[str, float] = {}

    data_dir = root / "data"
    data_key = _step_key(config_dict(cfg.data), cfg.run.seed)
    _, timings["data"] = run_step("data", data_dir, data_key, lambda: run_data(cfg.data, data_dir, seed=cfg.run.seed), log)

    summary = {"run": cfg.run.name, "data": json.loads((data_dir / "stats.json").read_text()),
               "timings_s": {k: round(v, 2) for k, v in timings.items()}}
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"run {cfg.run.name}: data in {data_dir}; summary in {root / 'summary.json'}")
    return summary
