"""HF `evaluate` module: win rate of a policy against a reference from per-item judge verdicts.

Verdict per item: 1.0 = policy wins, 0.5 = tie, 0.0 = reference wins. Returns the win rate (ties
count ½), its 95 % Wilson interval and the counts. Load offline: evaluate.load("<this folder>").
The math lives in dpoflow.evaluation.stats (one implementation, shared with `dpoflow eval`).
"""

import datasets
import evaluate

from dpoflow.evaluation.stats import win_rate_summary

_DESCRIPTION = "Win rate (ties count 1/2) with a 95% Wilson score interval."
_KWARGS_DESCRIPTION = """
Args:
    verdicts: list of float, 1.0 (policy wins), 0.5 (tie) or 0.0 (reference wins) per item.
Returns:
    win_rate, win_rate_ci_low, win_rate_ci_high, wins, ties, losses, n_prompts
Examples:
    >>> metric = evaluate.load("path/to/win_rate")
    >>> metric.compute(verdicts=[1.0, 0.5, 0.0, 1.0])["win_rate"]
    0.625
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Wilson, E. B. (1927). Probable inference, the law of succession, and statistical inference.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"verdicts": datasets.Value("float64")}),
        )

    def _compute(self, verdicts):
        return win_rate_summary(list(verdicts))
