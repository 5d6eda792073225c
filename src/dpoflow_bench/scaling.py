"""`dpoflow bench --suite scaling`: how a DPO step's cost grows with sequence length and model size,
dpoflow's default path against TRL's DPOTrainer."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from dpoflow_bench import CONTENDERS, SCALING_CONTENDERS, SCALING_LENGTHS, SCALING_MODELS
from dpoflow_bench.cases import make_case, scaling_model
from dpoflow_bench.harness import cuda, measure


def run_scaling(out_dir: str = "bench", steps: int = 2, batch: int = 4, lengths=SCALING_LENGTHS,
                sizes=tuple(SCALING_MODELS), size_length: int = 512, precision: str = "fp32", log=print) -> dict:
    """dpoflow's default path and TRL's DPOTrainer as the sequence (prompt + completion, half each)
    doubles from 256 to 2048 tokens on the 17M model, and as the model grows from 17M to 120M
    parameters at 512 tokens: s/step and peak memory (RSS on CPU, GPU memory on a GPU; a contender
    that runs out is recorded as such), a table (scaling.md), a plot (scaling.png) and the JSON
    (scaling.json) in `out_dir`."""
    import torch

    from dpoflow.dpo.reference import run_reference

    points = [(sizes[0], length) for length in lengths] + [(size, size_length) for size in sizes[1:]]
    rows = []
    for size, length in points:
        work = Path(tempfile.mkdtemp(prefix=f"dpoflow-scaling-{size}-{length}-"))
        setting = make_case("standard", batch, work, lengths=(length // 2, length // 2), model=scaling_model(size))
        max_length = setting["longest_sequence"] + 8
        run_reference(work / "pairs", work / "model", work / "reference", max_length=max_length, log=lambda *_: None)
        row = {"model": size, "parameters_m": setting["parameters_m"], "sequence_tokens": length, "pairs": batch}
        for name in SCALING_CONTENDERS:
            result = measure(*CONTENDERS[name], work, steps, batch, max_length, precision, name)
            row[name] = {"s_per_step": None, "peak_memory_mb": None, **result}  # None: out of memory
        ours, theirs = row["dpoflow"], row["trl"]
        if ours["s_per_step"] and theirs["s_per_step"]:
            row["speedup_vs_trl"] = round(theirs["s_per_step"] / ours["s_per_step"], 2)
            row["memory_ratio_vs_trl"] = round(ours["peak_memory_mb"] / theirs["peak_memory_mb"], 2)
        log(f"scaling {size:>5s} {length:5d} tokens: " + " | ".join(
            f"{name} " + (f"{row[name]['s_per_step']:7.3f} s/step {row[name]['peak_memory_mb']:6d} MB"
                          if row[name]["s_per_step"] else "out of memory") for name in SCALING_CONTENDERS))
        rows.append(row)
    device = torch.cuda.get_device_name() if cuda() else f"{torch.get_num_threads()} CPU threads"
    report = {"steps": steps, "pairs": batch, "device": device, "precision": precision,
              "memory": "peak GPU memory" if cuda() else "peak RSS", "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "scaling.md").write_text(_scaling_table(report))
    _scaling_plot(report, out / "scaling.png")
    return report


def _scaling_table(report: dict) -> str:
    def cell(result, key):
        return "out of memory" if result.get("out_of_memory") else result[key]

    lines = [f"| model | params | tokens/sequence | dpoflow s/step | TRL s/step | speedup | dpoflow {report['memory']} MB "
             f"| TRL {report['memory']} MB |", "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        ours, theirs = row["dpoflow"], row["trl"]
        speedup = f"{row['speedup_vs_trl']}x" if "speedup_vs_trl" in row else "-"
        lines.append(f"| {row['model']} | {row['parameters_m']}M | {row['sequence_tokens']} | {cell(ours, 's_per_step')} | "
                     f"{cell(theirs, 's_per_step')} | {speedup} | {cell(ours, 'peak_memory_mb')} | "
                     f"{cell(theirs, 'peak_memory_mb')} |")
    return "\n".join(lines) + "\n"


def _scaling_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    by_length = [r for r in rows if r["model"] == rows[0]["model"]]
    by_size = [r for r in rows if r["sequence_tokens"] == rows[-1]["sequence_tokens"]]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, (group, key, label) in enumerate([
            (by_length, "sequence_tokens", f"tokens per sequence ({rows[0]['model']} model)"),
            (by_size, "parameters_m", f"parameters, millions ({rows[-1]['sequence_tokens']} tokens)")]):
        for name, style in (("dpoflow", "o-"), ("trl", "s--")):
            ran = [r for r in group if r[name]["s_per_step"]]  # out-of-memory points are left out
            axes[0][column].plot([r[key] for r in ran], [r[name]["s_per_step"] for r in ran], style, label=name)
            axes[1][column].plot([r[key] for r in ran], [r[name]["peak_memory_mb"] for r in ran], style, label=name)
        for axis, what in ((axes[0][column], "s / step"), (axes[1][column], f"{report['memory']} (MB)")):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel(label)
            axis.set_ylabel(what)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend()
    figure.suptitle(f"DPO step cost, dpoflow (default path) vs TRL DPOTrainer, {report['precision']}, "
                    f"{report['device']}, {report['pairs']} pairs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
