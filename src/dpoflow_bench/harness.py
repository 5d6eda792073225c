"""The one harness every suite measures with: a contender (a kind of run and its settings) runs in a
process of its own (`python -m dpoflow_bench.harness ...`), so peak memory is its own; the parent
reads its result line. Training contenders (dpoflow's DPO and SFT loops, TRL's DPOTrainer and
SFTTrainer) run steps + 1 steps, the first one untimed; the others (reference scoring, sampling) are
timed whole. Out of memory is a result for the sweeps (`measure`), any other failure is an error.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from dpoflow_bench import CONTENDERS, LEARNING_RATE, SFT_CONTENDERS

TIMED_WHOLE = ("reference", "generate-dpoflow", "generate-hf")


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_worker(kind: str, settings: dict, work: Path, steps: int, batch: int, max_length: int,
               precision: str = "fp32", name: str | None = None) -> dict:
    """One contender (`kind` with `settings`) in its own process; its result line."""
    if precision != "fp32" or cuda():  # the same precision on both sides; TRL off its CPU default
        if kind in ("dpoflow", "sft-dpoflow"):
            settings = {**settings, "precision": precision}
        elif kind not in TIMED_WHOLE:  # TRL's trainers
            settings = {**settings, "bf16": precision == "bf16", "use_cpu": False}
    command = [sys.executable, "-m", "dpoflow_bench.harness", kind, json.dumps(settings), str(work), str(steps),
               str(batch), str(max_length)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench contender {name or kind!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_contender(name: str, work: Path, steps: int, batch: int, max_length: int, precision: str = "fp32") -> dict:
    kind, settings = {**CONTENDERS, **SFT_CONTENDERS}[name]
    return run_worker(kind, settings, work, steps, batch, max_length, precision, name)


def measure(kind: str, settings: dict, work: Path, steps: int, batch: int, max_length: int, precision: str,
            name: str | None = None) -> dict:
    """`run_worker`, with out of memory recorded as a result; peak memory = GPU memory on a GPU, else RSS."""
    try:
        result = run_worker(kind, settings, work, steps, batch, max_length, precision, name)
    except RuntimeError as error:  # out of memory is a result here, anything else is not
        if "out of memory" not in str(error).lower() and "(exit -9)" not in str(error):
            raise
        return {"out_of_memory": True}
    memory = result.get("peak_gpu_mb") or result["peak_rss_mb"]
    return {**{key: round(value, 4) for key, value in result.items() if key in ("s_per_step", "seconds", "loss")},
            "peak_memory_mb": round(memory), **({"tokens": result["tokens"]} if "tokens" in result else {})}


# ---- in the contender's process -----------------------------------------------------------------

def _peaks() -> dict:
    import torch

    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None}


def _contender(kind: str, settings: dict, work: Path, steps: int, batch: int, max_length: int) -> dict:
    import torch

    torch.manual_seed(0)
    if kind in TIMED_WHOLE:  # no steps: seconds and memory
        return {**_timed_whole(kind, settings, work, max_length), **_peaks()}
    train = _trl if kind in ("trl", "sft-trl") else _dpoflow
    times, losses = train(kind, settings, work, steps, batch, max_length)
    return {"s_per_step": (times[-1] - times[0]) / steps, "loss": losses[-1], **_peaks()}


def _dpoflow(kind: str, settings: dict, work: Path, steps: int, batch: int, max_length: int):
    """dpoflow's DPO loop (`run_dpo` on work/pairs) or SFT loop (`run_sft` on work/sft-data): the time
    and loss of every step."""
    times, losses = [], []

    def on_step(step, metrics):
        if "loss" in metrics:
            times.append(time.perf_counter())
            losses.append(metrics["loss"])

    common = {"max_steps": steps + 1, "per_device_batch_size": batch, "max_length": max_length,
              "learning_rate": LEARNING_RATE, "warmup_steps": 0, "scheduler": "constant", "log_every": 1,
              "checkpoint_every": 0, **settings}
    if kind == "dpoflow":
        from dpoflow.config import DpoConfig
        from dpoflow.dpo.train import run_dpo

        cfg = DpoConfig(**common)
        run_dpo(cfg, work / "pairs", work / "model", work / f"out-{os.getpid()}", log_metrics=on_step,
                reference_dir=work / "reference" if cfg.reference == "cached" else None, log=lambda *_: None)
    else:
        from dpoflow.config import ModelConfig, SftConfig
        from dpoflow.sft import run_sft

        run_sft(SftConfig(**common), ModelConfig(base=str(work / "model")), work / "sft-data",
                work / f"sft-{os.getpid()}", log_metrics=on_step, log=lambda *_: None)
    return times, losses


def _trl(kind: str, settings: dict, work: Path, steps: int, batch: int, max_length: int):
    """TRL's DPOTrainer (with a reference model, on work/pairs' prompt/chosen/rejected) or SFTTrainer
    (prompt-completion rows of work/sft-data: loss on completion tokens + EOS, mean over the batch's
    tokens, as ours) with the arguments dpoflow's loops get: AdamW, constant lr, clipping 1.0, no decay."""
    import datasets
    import pandas as pd
    import trl
    from transformers import TrainerCallback

    from dpoflow.modeling import load_model, load_tokenizer

    times = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    dpo = kind == "trl"
    data, columns = ("pairs", ["prompt", "chosen", "rejected"]) if dpo else ("sft-data", ["prompt", "completion"])
    args = {"output_dir": str(work / f"{kind}-{os.getpid()}"), "per_device_train_batch_size": batch,
            "max_steps": steps + 1, "learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant", "warmup_steps": 0,
            "max_grad_norm": 1.0, "weight_decay": 0.0, "optim": "adamw_torch", "logging_steps": 1, "report_to": [],
            "use_cpu": True, "max_length": max_length, "save_strategy": "no", "disable_tqdm": True, "bf16": False,
            "gradient_checkpointing": False, "seed": 0, **({"beta": 0.1} if dpo else {"packing": False}), **settings}
    trainer = (trl.DPOTrainer if dpo else trl.SFTTrainer)(
        model=load_model(str(work / "model")), args=(trl.DPOConfig if dpo else trl.SFTConfig)(**args),
        train_dataset=datasets.Dataset.from_pandas(pd.read_parquet(work / data / "train.parquet")[columns]),
        processing_class=load_tokenizer(str(work / "model")), callbacks=[Timer()],
        **({"ref_model": load_model(str(work / "model"))} if dpo else {}))
    trainer.train()
    return times, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _timed_whole(kind: str, settings: dict, work: Path, max_length: int) -> dict:
    """One measured run in this process: reference scoring, or sampling by dpoflow or HF."""
    import torch

    from dpoflow.modeling import load_model, load_tokenizer

    started = time.perf_counter()
    if kind == "reference":
        from dpoflow.dpo.reference import run_reference

        run_reference(work / "pairs", work / "model", work / "reference", max_length=max_length, log=lambda *_: None)
        return {"seconds": time.perf_counter() - started}
    import pandas as pd

    from dpoflow.generation import generate_ids
    from dpoflow.lm.logprobs import tokenize_prompt

    model, tokenizer = load_model(str(work / "model")).eval(), load_tokenizer(str(work / "model"))
    if torch.cuda.is_available():  # as the reference and DPO steps run there: the GPU, bf16
        model = model.to("cuda", dtype=torch.bfloat16)
    prompts = pd.read_parquet(work / "pairs" / "train.parquet")["prompt"].tolist()
    encoded = [tokenize_prompt(tokenizer, text) for text in (prompts * settings["prompts"])[:settings["prompts"]]]
    k, new, top_p = settings["samples"], settings["max_new_tokens"], settings["top_p"]
    started = time.perf_counter()
    if kind == "generate-dpoflow":
        generate_ids(model, tokenizer, encoded, num_samples=k, max_new_tokens=new, top_p=top_p)
    else:  # HF generate on the same rows, left-padded
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in encoded], device=model.device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in encoded], device=model.device)
        torch.manual_seed(0)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=top_p,
                           max_new_tokens=new, min_new_tokens=new, num_return_sequences=k,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return {"seconds": time.perf_counter() - started, "tokens": len(encoded) * k * new}


if __name__ == "__main__":  # one contender: python -m dpoflow_bench.harness <kind> <settings> <work> <steps> <batch> <max_length>
    kind, settings, work, steps, batch, max_length = sys.argv[1:7]
    print(json.dumps(_contender(kind, json.loads(settings), Path(work), int(steps), int(batch), int(max_length))))
