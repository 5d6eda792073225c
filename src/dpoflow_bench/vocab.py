"""`dpoflow bench --suite vocab`: real model shapes, and how the vocabulary decides memory.

Models are built from the real configurations with random weights (no download): Qwen2.5-0.5B
(hidden 896, 14/2 heads, intermediate 4864, vocabulary 151,936, tied head, q/k/v biases) and
Llama-3.2-1B (hidden 2048, 32/8 heads, intermediate 8192, vocabulary 128,256, tied head), the body
cut to `layers` layers on a CPU (whole with `layers=None`). The tokenizer is the bench's 2,000-token
one: the data uses its ids, the model scores every one of the vocabulary's rows.

For each vocabulary of the sweep (2k -> 32k -> 128k -> 152k) every contender runs in its own process:
- reference scoring alone (`run_reference`: what `dpoflow reference` and evaluation's scoring do),
- the DPO step: dpoflow's default path, TRL 1.16 `DPOTrainer`, and TRL with precomputed reference,
- the SFT step: dpoflow against TRL's `SFTTrainer`,
- sampling: `generate_ids` against HF `model.generate` on the same batches (top-p 0.9),
with seconds per step (or per run) and peak RSS (peak GPU memory on a GPU). Out of memory is a
result, recorded as such. Then what fits: from two batch sizes at the largest vocabulary, the
fixed and per-pair memory of each DPO contender and the most pairs each fits in a memory budget.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from dpoflow_bench import BUDGETS_GB, CONTENDERS, DPO, SFT_CONTENDERS, VOCABULARIES
from dpoflow_bench.cases import make_case, make_sft_case
from dpoflow_bench.harness import cuda, measure


def run_vocab(out_dir: str = "bench", shape: str = "qwen2.5-0.5b", layers: int | None = 2,
              vocabularies=VOCABULARIES, batch: int = 4, lengths: tuple[int, int] = (64, 128), steps: int = 2,
              sft_batch: int = 8, generate: dict | None = None, precision: str = "fp32", fit: bool = True,
              dpo_contenders=DPO, name: str = "vocab", log=print) -> dict:
    """The sweep (module docstring); writes `name`.json, .md and .png in `out_dir`."""
    import torch

    generate = generate or {"prompts": 8, "samples": 4, "max_new_tokens": 32, "top_p": 0.9}
    rows = []
    for vocab in vocabularies:
        spec = {"shape": shape, "layers": layers, "vocab": vocab}
        work = Path(tempfile.mkdtemp(prefix=f"dpoflow-vocab-{vocab}-"))
        setting = make_case("standard", batch, work, lengths=lengths, shape=spec)
        max_length = setting["longest_sequence"] + 8
        parameters = setting["parameters_m"] * 1e6
        row = {"vocab": vocab, "parameters_m": setting["parameters_m"], "weights_mb": round(parameters * 4 / 2 ** 20),
               "training_state_mb": round(4 * parameters * 4 / 2 ** 20), "setting": setting}
        row["reference"] = measure("reference", {}, work, 0, batch, max_length, precision)
        row["dpo"] = {contender: measure(*CONTENDERS[contender], work, steps, batch, max_length, precision,
                                          contender) for contender in dpo_contenders}
        sft_work = Path(tempfile.mkdtemp(prefix=f"dpoflow-vocab-sft-{vocab}-"))
        row["sft_setting"] = make_sft_case(sft_batch, sft_work, 128, shape=spec)
        row["sft"] = {contender: measure(*SFT_CONTENDERS[contender], sft_work, max(steps, 2), sft_batch, 128,
                                          precision, contender) for contender in SFT_CONTENDERS}
        for group, baseline in (("dpo", "trl"), ("sft", "trl SFTTrainer")):  # equal math: the same loss as TRL's
            base = row[group][baseline].get("loss")
            for result in row[group].values():
                if base is not None and "loss" in result:
                    result["loss_diff_vs_trl"] = abs(result["loss"] - base)
        row["generate"] = {contender: measure(kind, generate, work, 0, batch, max_length, precision)
                           for contender, kind in (("dpoflow generate_ids", "generate-dpoflow"),
                                              ("model.generate", "generate-hf"))}
        log(f"vocab {vocab:7d}: " + "  ".join(
            f"{contender} {_cell(result, 's_per_step')} s {_cell(result, 'peak_memory_mb')} MB"
            for contender, result in {"reference": row["reference"], **row["dpo"], **row["sft"]}.items()))
        rows.append(row)
    device = torch.cuda.get_device_name() if cuda() else f"{torch.get_num_threads()} CPU threads"
    report = {"shape": shape, "layers": layers, "pairs": batch, "lengths": list(lengths), "steps": steps,
              "precision": precision, "device": device, "memory": "peak GPU memory" if cuda() else "peak RSS",
              "rows": rows}
    if fit:
        report["fits"] = _fits(shape, layers, vocabularies[-1], batch, lengths, steps, precision, log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(vocab_table(report))
    _vocab_plot(report, out / f"{name}.png")
    return report


def _fits(shape, layers, vocab, batch, lengths, steps, precision, log) -> dict:
    """Peak memory of each DPO contender at `batch` and 2 x `batch` pairs: fixed + per-pair memory, and
    the most pairs of this length each fits in the budgets (a linear fit of two measured points)."""
    measured = {}
    for pairs in (batch, 2 * batch):
        work = Path(tempfile.mkdtemp(prefix=f"dpoflow-fit-{pairs}-"))
        setting = make_case("standard", pairs, work, lengths=lengths, shape={"shape": shape, "layers": layers,
                                                                             "vocab": vocab})
        max_length = setting["longest_sequence"] + 8
        measure("reference", {}, work, 0, pairs, max_length, precision)
        measured[pairs] = {name: measure(*CONTENDERS[name], work, 1, pairs, max_length, precision, name)
                           for name in ("dpoflow", "trl")}
    fits = {}
    for name in ("dpoflow", "trl"):
        low, high = measured[batch][name], measured[2 * batch][name]
        if low.get("out_of_memory") or high.get("out_of_memory"):
            fits[name] = {"out_of_memory": True}
            continue
        per_pair = (high["peak_memory_mb"] - low["peak_memory_mb"]) / batch
        if per_pair < 1.0:  # the two peaks are set by fixed costs: no per-pair figure to extrapolate from
            fits[name] = {"fixed_mb": round(high["peak_memory_mb"]), "per_pair_mb": None,
                          "pairs_in_budget": {f"{gb} GB": None for gb in BUDGETS_GB}}
            log(f"fits {name}: the peak did not grow from {batch} to {2 * batch} pairs: measure larger batches")
            continue
        fixed = low["peak_memory_mb"] - per_pair * batch
        fits[name] = {"fixed_mb": round(fixed), "per_pair_mb": round(per_pair, 1),
                      "pairs_in_budget": {f"{gb} GB": max(0, int((gb * 1024 - fixed) // per_pair))
                                          for gb in BUDGETS_GB}}
        log(f"fits {name}: {fixed:.0f} MB + {per_pair:.1f} MB per pair of {lengths[0] + 2 * lengths[1]} tokens -> "
            + ", ".join(f"{budget}: {n}" for budget, n in fits[name]["pairs_in_budget"].items()))
    return {"vocab": vocab, "pair_tokens": lengths[0] + 2 * lengths[1], "measured_at_pairs": [batch, 2 * batch],
            "contenders": fits}


def _cell(result: dict, key: str):
    if result.get("out_of_memory"):
        return "OOM"
    value = result.get(key, result.get("seconds"))
    return f"{value:.3f}" if isinstance(value, float) else value


def vocab_table(report: dict) -> str:
    memory = report["memory"]
    lines = [f"{report['shape']}, {report['layers'] or 'all'} layers, {report['precision']}, {report['device']}; "
             f"DPO {report['pairs']} pairs of {report['lengths'][0]} + 2 x {report['lengths'][1]} tokens; "
             f"{memory} in MB", "",
             "| vocabulary | params | weights MB | training state MB | step | contender | s | "
             f"{memory} MB | vs TRL (time) | vs TRL (memory) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        groups = {"reference scoring": {"dpoflow reference": row["reference"]}, "DPO step": row["dpo"],
                  "SFT step": row["sft"], "sampling": row["generate"]}
        baselines = {"DPO step": row["dpo"].get("trl"), "SFT step": row["sft"].get("trl SFTTrainer"),
                     "sampling": row["generate"].get("model.generate")}
        for step, results in groups.items():
            for name, result in results.items():
                base = baselines.get(step)
                ratio_time = ratio_memory = "-"
                if base and base is not result and not base.get("out_of_memory") and not result.get("out_of_memory"):
                    ratio_time = f"{_time(base) / _time(result):.2f}x faster"
                    ratio_memory = f"{result['peak_memory_mb'] / base['peak_memory_mb']:.2f}x"
                lines.append(f"| {row['vocab']} | {row['parameters_m']}M | {row['weights_mb']} | "
                             f"{row['training_state_mb']} | {step} | {name} | {_cell(result, 's_per_step')} | "
                             f"{_cell(result, 'peak_memory_mb')} | {ratio_time} | {ratio_memory} |")
    if "fits" in report:
        fits = report["fits"]
        lines += ["", f"Most DPO pairs of {fits['pair_tokens']} tokens per step at vocabulary {fits['vocab']} "
                  f"(fit of batches {fits['measured_at_pairs']}):", "",
                  "| contender | fixed MB | per pair MB | " + " | ".join(f"{gb} GB" for gb in BUDGETS_GB) + " |",
                  "|---|---|---|" + "---|" * len(BUDGETS_GB)]
        for name, fit in fits["contenders"].items():
            if fit.get("out_of_memory"):
                lines.append(f"| {name} | OOM | | " + " | ".join("" for _ in BUDGETS_GB) + " |")
                continue
            lines.append(f"| {name} | {fit['fixed_mb']} | {fit['per_pair_mb'] or 'not resolved'} | "
                         + " | ".join("-" if n is None else str(n) for n in fit["pairs_in_budget"].values()) + " |")
    return "\n".join(lines) + "\n"


def _time(result: dict) -> float:
    return result.get("s_per_step") or result["seconds"]


def _vocab_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    figure, axes = plt.subplots(2, 3, figsize=(14, 7))
    for column, (step, key) in enumerate((("DPO step", "dpo"), ("SFT step", "sft"), ("sampling", "generate"))):
        for name in rows[0][key]:
            ran = [r for r in rows if not r[key][name].get("out_of_memory")]
            vocab = [r["vocab"] for r in ran]
            axes[0][column].plot(vocab, [_time(r[key][name]) for r in ran], "o-", label=name)
            axes[1][column].plot(vocab, [r[key][name]["peak_memory_mb"] for r in ran], "o-", label=name)
        if key == "dpo":
            axes[1][column].plot([r["vocab"] for r in rows], [r["training_state_mb"] for r in rows], "k:",
                                 label="training state (weights, grads, Adam)")
        for axis, what in ((axes[0][column], "s / step" if key != "generate" else "s"),
                           (axes[1][column], f"{report['memory']} (MB)")):
            axis.set_xscale("log")
            axis.set_xlabel("vocabulary")
            axis.set_ylabel(what)
            axis.set_title(step)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
    figure.suptitle(f"{report['shape']} shape, {report['layers'] or 'all'} layers, {report['precision']}, "
                    f"{report['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
