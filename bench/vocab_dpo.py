"""The DPO step at 151,936 vocabulary rows only (the vocab suite's two settings), dpoflow against TRL,
each contender in its own process: what the real-shape targets are stated in, in ~30 min on 2 cores.

    .venv/bin/python bench/vocab_dpo.py bench/vocab-dpo-152k.json

short: 4 pairs of 64 + 2 x 128 tokens (vocab.md); long: 8 pairs of 64 + 2 x 400 (vocab-long.md).
Qwen2.5-0.5B shape, body cut to 2 layers, random weights, fp32, 2 timed steps after a warm-up.
"""

import json
import sys
import tempfile
from pathlib import Path

from dpoflow_bench import CONTENDERS
from dpoflow_bench.cases import make_case
from dpoflow_bench.harness import measure

SETTINGS = {"short": (4, (64, 128)), "long": (8, (64, 400))}


def main(out: str) -> dict:
    report = {}
    for name, (pairs, lengths) in SETTINGS.items():
        work = Path(tempfile.mkdtemp(prefix=f"dpoflow-vocab-dpo-{name}-"))
        setting = make_case("standard", pairs, work, lengths=lengths,
                            shape={"shape": "qwen2.5-0.5b", "layers": 2, "vocab": 151_936})
        max_length = setting["longest_sequence"] + 8
        measure("reference", {}, work, 0, pairs, max_length, "fp32")  # the cached reference dpoflow trains with
        results = {contender: measure(*CONTENDERS[contender], work, 2, pairs, max_length, "fp32", contender)
                   for contender in ("dpoflow", "trl")}
        ours, trl = results["dpoflow"], results["trl"]
        report[name] = {"setting": setting, "results": results,
                        "speedup_vs_trl": round(trl["s_per_step"] / ours["s_per_step"], 3),
                        "memory_vs_trl": round(ours["peak_memory_mb"] / trl["peak_memory_mb"], 3),
                        "loss_diff_vs_trl": abs(ours["loss"] - trl["loss"])}
        print(name, json.dumps(report[name]["results"]), flush=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1])
