"""`dpoflow reference`: the frozen reference's log-probs over all pairs, computed once.

The output is keyed by hash(pairs fingerprint, reference weights hash, tokenizer files, max_length,
truncation). `run_reference` with a cache dir reuses an earlier result with the same key (and says
so); the DPO loop recomputes the key from its own inputs and refuses a cache built for other ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dpoflow.dpo.pairs import tokenize_pairs
from dpoflow.lm.logprobs import score_pairs
from dpoflow.manifest import files_digest

LOGPS_FILE = "reference_logps.parquet"
KEY_FILE = "reference.json"


class ReferenceCacheError(ValueError):
    """Missing or mismatched reference log-probs."""


@dataclass
class ReferenceResult:
    out_dir: Path
    cache_key: str
    reused: bool


def frame_fingerprint(frame) -> str:
    return hashlib.sha256(frame[["prompt", "chosen", "rejected"]].to_json(orient="records").encode()).hexdigest()[:16]


def cache_key(frames: dict, model_dir: Path, max_length: int, truncation: str) -> str:
    model_dir = Path(model_dir)
    weights = list(model_dir.glob("*.safetensors"))
    if not weights:  # never key a cache on weights it cannot see
        raise ReferenceCacheError(
            f"reference model {model_dir} is not a local folder with *.safetensors weights; the reference "
            "cache is keyed by the weights' content: download or convert the model to a local folder first"
        )
    parts = {
        "pairs": {name: frame_fingerprint(frame) for name, frame in sorted(frames.items())},
        "weights": files_digest(weights, names=True),
        "tokenizer": files_digest([p for p in model_dir.glob("*.json") if "token" in p.name or p.name == "config.json"],
                                  names=True),
        "max_length": max_length,
        "truncation": truncation,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def compute_logps(model, tokenizer, frame, max_length: int, truncation: str, batch_size: int = 16):
    """((N, 4) [chosen logps, rejected logps, chosen lengths, rejected lengths], truncated count)."""
    pairs = tokenize_pairs(frame, tokenizer, max_length, truncation)
    if len(pairs) == 0:  # an empty split (e.g. no held-out pairs): nothing to score
        return torch.zeros((0, 4), dtype=torch.float64), 0
    sums, counts = score_pairs(model, pairs, tokenizer.pad_token_id, batch_size)
    values = torch.cat([sums, counts.float()], dim=1)
    return values.double(), pairs.truncated


def load_pair_frames(pairs_dir: Path) -> dict:
    import pandas as pd

    frames = {split: pd.read_parquet(pairs_dir / f"{split}.parquet") for split in ("train", "eval")
              if (pairs_dir / f"{split}.parquet").exists()}
    if not frames or all(len(f) == 0 for f in frames.values()):
        raise ValueError(f"{pairs_dir} holds no preference pairs (train.parquet / eval.parquet missing or empty)")
    return frames


def run_reference(pairs_dir, model_dir, out_dir, *, max_length: int, truncation: str = "keep_start",
                  batch_size: int = 16, cache_dir=None, log=print) -> ReferenceResult:
    """The reference model's log-probs over every pair, built atomically (manifest.py)."""
    from dpoflow.manifest import building

    with building("reference", out_dir, config=[max_length, truncation], inputs={"pairs": pairs_dir, "model": model_dir},
                  verify_inputs={"model": False}) as (work, _):
        result = _run_reference(pairs_dir, model_dir, work, max_length=max_length, truncation=truncation,
                                batch_size=batch_size, cache_dir=cache_dir, log=log)
    return ReferenceResult(Path(out_dir), result.cache_key, result.reused)


def _run_reference(pairs_dir, model_dir, out_dir, *, max_length: int, truncation: str, batch_size: int, cache_dir,
                   log) -> ReferenceResult:
    import pandas as pd

    from dpoflow.modeling import load_model, load_tokenizer

    pairs_dir, model_dir, out_dir = Path(pairs_dir), Path(model_dir), Path(out_dir)
    frames = load_pair_frames(pairs_dir)
    key = cache_key(frames, model_dir, max_length, truncation)
    cached = Path(cache_dir) / key if cache_dir else None
    if cached is not None and (cached / KEY_FILE).exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (LOGPS_FILE, KEY_FILE):
            shutil.copy2(cached / name, out_dir / name)
        log(f"reference: cache hit {key} ({cached}); no forward pass needed")
        return ReferenceResult(out_dir, key, reused=True)

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir))
    if torch.cuda.is_available():
        model = model.to("cuda", dtype=torch.bfloat16)
    rows = []
    truncated = 0
    for split, frame in frames.items():
        values, split_truncated = compute_logps(model, tokenizer, frame, max_length, truncation, batch_size)
        truncated += split_truncated
        rows.append(pd.DataFrame({"split": split, "row": range(len(frame)), "chosen_logps": values[:, 0].numpy(),
                                  "rejected_logps": values[:, 1].numpy(), "chosen_lengths": values[:, 2].numpy(),
                                  "rejected_lengths": values[:, 3].numpy()}))
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.concat(rows).to_parquet(out_dir / LOGPS_FILE, index=False)
    info = {"cache_key": key, "max_length": max_length, "truncation": truncation, "truncated_pairs": truncated,
            "pairs": {s: len(f) for s, f in frames.items()}, "model_dir": str(model_dir)}
    (out_dir / KEY_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if cached is not None and not cached.exists():  # shared by concurrent runs: appears whole or not at all
        staging = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        staging.mkdir(parents=True, exist_ok=True)
        for name in (LOGPS_FILE, KEY_FILE):
            shutil.copy2(out_dir / name, staging / name)
        try:
            staging.rename(cached)
        except OSError:  # another run put the same entry there first
            shutil.rmtree(staging, ignore_errors=True)
    log(f"reference: computed log-probs of {sum(info['pairs'].values())} pairs, key {key}")
    return ReferenceResult(out_dir, key, reused=False)


def load_reference_logps(reference_dir, expected_key: str, split: str = "train") -> torch.Tensor:
    """(N, 4) tensor [chosen, rejected, chosen_len, rejected_len] for `split`; checks the cache key."""
    import pandas as pd

    reference_dir = Path(reference_dir)
    if not (reference_dir / KEY_FILE).exists():
        raise ReferenceCacheError(
            f"no reference log-probs in {reference_dir} (missing {KEY_FILE}); run `dpoflow reference` first "
            "or set dpo.reference=live"
        )
    found = json.loads((reference_dir / KEY_FILE).read_text())["cache_key"]
    if found != expected_key:
        raise ReferenceCacheError(
            f"reference log-probs in {reference_dir} were computed for other inputs (key {found}, expected "
            f"{expected_key}: pairs, reference weights, tokenizer or max_length differ); rerun `dpoflow reference`"
        )
    frame = pd.read_parquet(reference_dir / LOGPS_FILE)
    frame = frame[frame.split == split].sort_values("row")
    return torch.tensor(frame[["chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths"]].to_numpy())
