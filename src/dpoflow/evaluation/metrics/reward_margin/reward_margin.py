"""HF `evaluate` module: mean judge-reward margin (policy − reference) with a bootstrap 95 % interval.

Load offline: evaluate.load("<this folder>"). The math lives in dpoflow.evaluation.stats.
"""

import datasets
import evaluate

from dpoflow.evaluation.stats import reward_margin_summary

_DESCRIPTION = "Mean reward of policy and reference completions, and their margin with a bootstrap 95% interval."
_KWARGS_DESCRIPTION = """
Args:
    policy_scores: list of float, judge reward of each policy completion.
    reference_scores: list of float, judge reward of the reference completion for the same prompt.
    seed: int, bootstrap seed (default 0).
Returns:
    reward_policy, reward_reference, reward_margin, reward_margin_ci_low, reward_margin_ci_high
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RewardMargin(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"policy_scores": datasets.Value("float64"),
                                        "reference_scores": datasets.Value("float64")}),
        )

    def _compute(self, policy_scores, reference_scores, seed=0):
        return reward_margin_summary(list(policy_scores), list(reference_scores), seed=seed)
