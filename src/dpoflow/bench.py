"""`dpoflow bench`: DPO training throughput of dpoflow against TRL's DPOTrainer on the same model,
data and batch (TRL is a dev dependency; the bench says so if it is missing).

Setting (default = the one in shared REFERENCE.md): a ~15M-parameter Llama built from a config,
global batch 8 pairs, ~83-token prompts and ~83-token completions, fp32 on CPU. Each contender trains the
same number of steps; the first step is warm-up and not timed. Reported: s/step and pairs/s.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path


def _synthetic_pairs(n: int, prompt_words: int, completion_words: int, seed: int = 0):
    import pandas as pd

    from dpoflow.data.demo import generate_reviews

    words = " ".join(generate_reviews(400, seed)).split()
    rng = random.Random(seed)

    def text(count):
        start = rng.randrange(len(words) - count)
        return " ".join(words[start:start + count])

    return pd.DataFrame([{"prompt": text(prompt_words), "chosen": " " + text(completion_words),
                          "rejected": " " + text(completion_words), "prompt_messages": ""} for _ in range(n)])


def _time_dpoflow(model_dir, pairs_dir, steps, batch, max_length, reference, prefix_sharing) -> float:
    from dpoflow.config import DpoConfig
    from dpoflow.dpo.reference import run_reference
    from dpoflow.dpo.train import run_dpo

    work = Path(tempfile.mkdtemp(prefix="dpoflow-bench-"))
    reference_dir = None
    if reference == "cached":
        reference_dir = work / "reference"
        run_reference(pairs_dir, model_dir, reference_dir, max_length=max_length, log=lambda *_: None)
    cfg = DpoConfig(max_steps=1, per_device_batch_size=batch, max_length=max_length, reference=reference,
                    prefix_sharing=prefix_sharing, log_every=1000)
    warm = run_dpo(cfg, pairs_dir, model_dir, work / "warm", reference_dir=reference_dir, log=lambda *_: None)
    full = run_dpo(cfg.model_copy(update={"max_steps": steps + 1}), pairs_dir, model_dir, work / "run",
                   reference_dir=reference_dir, log=lambda *_: None)
    return (full["seconds"] - warm["seconds"]) / steps


def _time_trl(model_dir, frame, steps, batch, max_length, precompute) -> float:
    import datasets
    import trl
    from transformers import TrainerCallback

    from dpoflow.modeling import load_model, load_tokenizer

    class StepTimer(TrainerCallback):
        times: list = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    tokenizer = load_tokenizer(str(model_dir))
    timer = StepTimer()
    timer.times = []
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=batch,
                         max_steps=steps + 1, learning_rate=5e-4, beta=0.1, logging_steps=1000, report_to=[],
                         use_cpu=True, max_length=max_length, save_strategy="no", disable_tqdm=True,
                         precompute_ref_log_probs=precompute,
                         # TRL 1.16 defaults to bf16 autocast and gradient checkpointing even on CPU;
                         # both contenders run fp32 without recomputation here
                         bf16=False, gradient_checkpointing=False)
    trainer = trl.DPOTrainer(model=load_model(str(model_dir)), ref_model=load_model(str(model_dir)), args=args,
                             train_dataset=datasets.Dataset.from_pandas(frame[["prompt", "chosen", "rejected"]]),
                             processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return (timer.times[-1] - timer.times[0]) / steps


def run_bench(steps: int = 5, batch: int = 8, prompt_words: int = 70, completion_words: int = 70,
              preset: str = "bench", out: str | None = None, log=print) -> dict:
    import torch

    from dpoflow.dpo.logprobs import tokenize_pairs
    from dpoflow.modeling import build_model, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="dpoflow-bench-"))
    frame = _synthetic_pairs(batch * (steps + 2), prompt_words, completion_words)
    tokenizer = train_tokenizer(frame.prompt.tolist() + frame.chosen.tolist(), vocab_size=2000)
    model = build_model(tokenizer, preset)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    (work / "pairs").mkdir()
    frame.to_parquet(work / "pairs" / "train.parquet")
    pairs = tokenize_pairs(frame, tokenizer, 1024)
    setting = {
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "batch_pairs": batch, "timed_steps": steps, "torch_threads": torch.get_num_threads(),
        "prompt_tokens": round(sum(map(len, pairs.prompt_ids)) / len(pairs), 1),
        "completion_tokens": round(sum(map(len, pairs.chosen_ids)) / len(pairs), 1),
    }
    max_length = 512
    results = {}
    model, pairs = work / "model", work / "pairs"
    for name, fn in [
        ("dpoflow (cached reference)", lambda: _time_dpoflow(model, pairs, steps, batch, max_length, "cached", False)),
        ("dpoflow (cached reference, prefix sharing)",
         lambda: _time_dpoflow(model, pairs, steps, batch, max_length, "cached", True)),
        ("dpoflow (live reference)", lambda: _time_dpoflow(model, pairs, steps, batch, max_length, "live", False)),
        ("trl DPOTrainer", lambda: _time_trl(work / "model", frame, steps, batch, max_length, False)),
        ("trl DPOTrainer (precompute_ref_log_probs)", lambda: _time_trl(work / "model", frame, steps, batch, max_length, True)),
    ]:
        try:
            seconds = fn()
        except ImportError as error:
            log(f"{name}: skipped ({error})")
            continue
        results[name] = {"s_per_step": round(seconds, 3), "pairs_per_s": round(batch / seconds, 2)}
        log(f"{name:45s} {seconds:7.3f} s/step  {batch / seconds:6.2f} pairs/s")
    report = {"setting": setting, "results": results}
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report
