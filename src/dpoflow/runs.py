"""`dpoflow runs`: the experiment's runs as a terminal table, and the differences between two runs."""

from __future__ import annotations

PARAMS = ("dpo.beta", "dpo.loss_type", "dpo.learning_rate", "dpo.max_steps", "dpo.reference", "data.md5")
METRICS = ("eval/win_rate", "eval/win_rate_ci_low", "eval/kl", "eval/reward_margin", "loss")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("-" if value is None else str(value))


def runs_table(experiment: str, sort: str = "eval/win_rate", limit: int = 20) -> str:
    """One row per β run (runs with a `dpo.beta` param): key params vs key metrics, best first."""
    from dpoflow.tracking import search_runs

    runs = [r for r in search_runs(experiment, max_results=500)
            if "dpo.beta" in r.data.params and "mlflow.parentRunId" in r.data.tags]
    if not runs:
        return f"no DPO runs in experiment '{experiment}' yet (dpoflow run creates them)"
    runs.sort(key=lambda r: r.data.metrics.get(sort, float("-inf")), reverse=True)
    header = ["run id", "name", "duration s", *PARAMS, *METRICS]
    rows = []
    for run in runs[:limit]:
        end = run.info.end_time or run.info.start_time
        rows.append([run.info.run_id[:12], run.info.run_name, _fmt((end - run.info.start_time) / 1000),
                     *(run.data.params.get(p, "-") for p in PARAMS),
                     *(_fmt(run.data.metrics.get(m)) for m in METRICS)])
    return _table(header, rows) + f"\n(sorted by {sort}; {len(runs)} runs)"


def compare_runs(run_a: str, run_b: str, experiment: str = "dpoflow") -> str:
    """Params and metrics that differ between two runs (ids, or the id prefixes `dpoflow runs` shows)."""
    from dpoflow.tracking import client

    c = client()
    a, b = (c.get_run(_full_id(run, experiment)) for run in (run_a, run_b))
    lines = [f"A = {a.info.run_name} ({a.info.run_id}), B = {b.info.run_name} ({b.info.run_id})"]
    for kind, left, right in (("param", a.data.params, b.data.params), ("metric", a.data.metrics, b.data.metrics)):
        rows = [[kind, key, _fmt(left.get(key)), _fmt(right.get(key))]
                for key in sorted(set(left) | set(right)) if left.get(key) != right.get(key)]
        lines.append(_table([kind, "key", "A", "B"], rows) if rows else f"(no {kind} differs)")
    return "\n\n".join(lines)


def _full_id(prefix: str, experiment: str) -> str:
    if len(prefix) == 32:
        return prefix
    from dpoflow.tracking import search_runs

    matches = [r.info.run_id for r in search_runs(experiment, 1000) if r.info.run_id.startswith(prefix)]
    if len(matches) != 1:
        raise ValueError(f"run id prefix {prefix!r} matches {len(matches)} runs; give more characters")
    return matches[0]
