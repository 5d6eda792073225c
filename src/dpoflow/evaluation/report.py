"""Self-contained HTML reports: plots are PNGs embedded as base64, so one file travels anywhere
(KFP's HTML artifact viewer, an MLflow artifact, an email).

    write_report(path, metrics, samples, training_metrics)   one evaluation
    write_frontier(out_dir, evaluations)                      a β sweep: mean reward vs KL (paper Fig. 2)
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _figure().close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"/>'


def _training_plot(path: Path) -> str | None:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path and Path(path).exists() else []
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    plt = _figure()
    keys = [k for k in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm") if k in rows[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for axis, key in zip(axes if len(keys) > 1 else [axes], keys):
        axis.plot([r["step"] for r in rows], [r[key] for r in rows])
        axis.set_title(key)
        axis.set_xlabel("step")
    return _png(fig)


def _reward_plot(samples) -> str | None:
    if samples["policy_score"].isna().all():
        return None
    plt = _figure()
    fig, axis = plt.subplots(figsize=(5, 3))
    axis.hist([samples["reference_score"].astype(float), samples["policy_score"].astype(float)], bins=20,
              label=["reference", "policy"])
    axis.set_title("judge reward per completion")
    axis.legend()
    return _png(fig)


def _win_rate_plot(metrics) -> str:
    plt = _figure()
    fig, axis = plt.subplots(figsize=(4, 3))
    rate = metrics["win_rate"]
    axis.bar(["policy vs reference"], [rate],
             yerr=[[max(0.0, rate - metrics["win_rate_ci_low"])], [max(0.0, metrics["win_rate_ci_high"] - rate)]],
             capsize=8)
    axis.axhline(0.5, color="grey", linestyle="--")
    axis.set_ylim(0, 1)
    axis.set_title(f"win rate {rate:.3f} (95% CI)")
    return _png(fig)


def _table(metrics: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v:.4g}</td></tr>" if isinstance(v, float)
                   else f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in metrics.items())
    return f"<table>{rows}</table>"


def _page(title: str, body: str) -> str:
    style = "body{font-family:sans-serif;margin:2em}td{padding:2px 12px;border-bottom:1px solid #ddd}"
    from dpoflow.redact import redact

    return redact(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                  f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def write_report(path, metrics: dict, samples, training_metrics=None) -> Path:
    parts = ["<h2>Metrics</h2>", _table(metrics), "<h2>Win rate</h2>", _win_rate_plot(metrics)]
    rewards = _reward_plot(samples)
    if rewards:
        parts += ["<h2>Judge rewards</h2>", rewards]
    training = _training_plot(Path(training_metrics)) if training_metrics else None
    if training:
        parts += ["<h2>Training curves</h2>", training]
    examples = samples.head(5)
    parts.append("<h2>Examples</h2><table><tr><th>prompt</th><th>policy</th><th>reference</th><th>verdict</th></tr>")
    parts += [f"<tr><td>{html.escape(r.prompt)}</td><td>{html.escape(r.policy)}</td><td>{html.escape(r.reference)}</td>"
              f"<td>{r.verdict}</td></tr>" for r in examples.itertuples()]
    parts.append("</table>")
    path = Path(path)
    path.write_text(_page(f"dpoflow evaluation (β={metrics.get('beta')})", "".join(parts)))
    return path


def write_frontier(out_dir, evaluations: dict[str, dict]) -> dict:
    """Mean judge reward vs KL(π‖π_ref) for each run of a sweep: frontier.json + frontier.html. With
    on-policy rounds (metrics carry `round`): one curve per round over the βs, and win rate and
    diversity per round for each β."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = [{"run": name, "beta": m.get("beta"), "kl": m["kl"], "reward": m.get("reward_policy"),
              "win_rate": m["win_rate"],
              **({"round": m["round"], "distinct_2": m.get("distinct_2_policy"),
                  "repetition": m.get("repetition_policy"), **({"stopped": m["stopped"]} if m.get("stopped") else {})}
                 if "round" in m else {})}
             for name, m in evaluations.items()]
    table.sort(key=lambda row: (row.get("round", 1), row["kl"]))
    (out_dir / "frontier.json").write_text(json.dumps(table, indent=2) + "\n")
    plt = _figure()
    fig, axis = plt.subplots(figsize=(5, 3.5))
    rounds = sorted({row.get("round", 1) for row in table})
    for r in rounds:
        points = [row for row in table if row.get("round", 1) == r and row["reward"] is not None]
        axis.plot([p["kl"] for p in points], [p["reward"] for p in points], marker="o",
                  label=f"round {r}" if len(rounds) > 1 else None)
        for row in points:
            axis.annotate(f"β={row['beta']:g}", (row["kl"], row["reward"]))
    if len(rounds) > 1:
        axis.legend()
    axis.set_xlabel("KL(π‖π_ref) (nats per completion)")
    axis.set_ylabel("mean judge reward")
    axis.set_title("reward vs KL frontier")
    body = _table({f"{r['run']}": f"KL {r['kl']:.2f}, reward {r['reward']}, win rate {r['win_rate']:.3f}"
                   + (f", distinct-2 {r['distinct_2']:.3f}, repetition {r['repetition']:.3f}"
                      if r.get("distinct_2") is not None else "")
                   + (f" (stopped: {r['stopped']})" if r.get("stopped") else "")
                   for r in table}) + _png(fig)
    if len(rounds) > 1:
        body += "<h2>Per round</h2>" + _rounds_plot(table)
    (out_dir / "frontier.html").write_text(_page("dpoflow β sweep: reward vs KL", body))
    return {"frontier": table}


def _rounds_plot(table: list[dict]) -> str:
    """Win rate and distinct-2 of each β's policy across the on-policy rounds."""
    plt = _figure()
    fig, (wins, spread) = plt.subplots(1, 2, figsize=(9, 3.2))
    for beta in sorted({row["beta"] for row in table}):
        rows = sorted((row for row in table if row["beta"] == beta), key=lambda row: row["round"])
        wins.plot([r["round"] for r in rows], [r["win_rate"] for r in rows], marker="o", label=f"β={beta:g}")
        spread.plot([r["round"] for r in rows], [r["distinct_2"] for r in rows], marker="o", label=f"β={beta:g}")
    wins.set_xlabel("round")
    wins.set_ylabel("win rate vs reference")
    spread.set_xlabel("round")
    spread.set_ylabel("distinct-2 of policy samples")
    wins.legend()
    return _png(fig)
