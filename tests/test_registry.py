"""The model lifecycle: the selection and gate rules (pure functions, numbers worked by hand), then
register → select → gate → promote → rollback against a real sqlite MLflow registry; compare-and-set
promotion and its alias lock against a real MLflow server (both orders, two processes at once)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from dpoflow.registry import gate_decision, select_best


def row(version, beta, win, low, high, kl, eval_set="e1"):
    return {"version": version, "beta": beta, "win_rate": win, "win_rate_ci_low": low, "win_rate_ci_high": high,
            "kl": kl, "eval_set_hash": eval_set}


SWEEP = [row("1", 0.1, 0.96, 0.94, 0.98, 5.2), row("2", 0.5, 0.97, 0.95, 0.99, 2.1), row("3", 2.0, 0.93, 0.90, 0.96, 0.8)]


def test_select_highest_interval_lower_bound_within_the_kl_budget():
    best, reason = select_best(SWEEP)
    assert best["version"] == "2" and "lower bound 0.950" in reason
    best, reason = select_best(SWEEP, max_kl=2.0)  # only β=2.0 (KL 0.8) is within budget
    assert best["version"] == "3" and "2 candidate(s) above registry.max_kl=2.0 skipped" in reason
    tie = [row("1", 0.1, 0.9, 0.8, 0.95, 3.0), row("2", 0.5, 0.9, 0.8, 0.95, 1.0)]
    assert select_best(tie)[0]["version"] == "2"  # equal lower bounds: the lower KL
    assert select_best(SWEEP, max_kl=0.5) == (None, "no candidate within registry.max_kl=0.5 (KLs: [5.2, 2.1, 0.8])")


def test_select_skips_a_judge_hack_that_would_hide_a_sound_candidate():
    """The demo's round 2 (run.rounds=2): β 0.1 and 0.5 win every prompt but pad their answers (1.31x
    the reference's length); β 2.0 wins less and is sound. Select hands the gate the sound one."""
    hacked = {"diversity_ratio": 0.51, "length_policy": 42.9, "length_reference": 32.7}
    rows = [{**row("1", 0.5, 1.0, 0.989, 1.0, 9.2), **hacked}, {**row("2", 0.1, 1.0, 0.989, 1.0, 20.4), **hacked},
            {**row("3", 2.0, 0.973, 0.949, 0.986, 2.3), "diversity_ratio": 0.84, "length_policy": 36.5,
             "length_reference": 32.7}]
    assert select_best(rows)[0]["version"] == "1"  # without the floors: the padded one (lower KL of the tie)
    best, reason = select_best(rows, min_diversity=0.5, max_length_ratio=1.25)
    assert best["version"] == "3"
    assert reason.endswith("2 candidate(s) below registry.min_diversity=0.5 or above registry.max_length_ratio=1.25 "
                           "skipped")
    assert gate_decision(best, 0.55, min_diversity=0.5, max_length_ratio=1.25)[0]
    # when every candidate is hacked, select still picks one and the gate refuses it with the reason
    assert select_best(rows[:2], min_diversity=0.5, max_length_ratio=1.25)[0]["version"] == "1"


def test_gate_rules():
    good = row("4", 0.5, 0.70, 0.58, 0.80, 1.0)
    assert gate_decision(good, 0.6) == (True, ["pass: win rate 0.700 vs registry.min_win_rate 0.6",
                                                "pass: win-rate interval lower bound 0.580 > 0.5",
                                                "pass: no champion yet"])
    passed, reasons = gate_decision(good, 0.75)
    assert not passed and reasons[0].startswith("fail: win rate 0.700")
    lucky = row("5", 0.5, 0.60, 0.45, 0.73, 1.0)  # above the bar but the interval reaches below 0.5
    assert gate_decision(lucky, 0.55)[0] is False
    # same eval set: a champion whose win rate lies above the candidate's interval wins
    champion = row("1", 0.1, 0.85, 0.80, 0.90, 2.0)
    passed, reasons = gate_decision(good, 0.6, champion)
    assert not passed and "champion v1 win rate 0.850 on the same eval set is not above" in reasons[-1]
    assert gate_decision(good, 0.6, row("1", 0.1, 0.78, 0.7, 0.85, 2.0))[0] is True
    # another eval set: only a head-to-head comparison decides, and its interval must reach 0.5
    other = row("1", 0.1, 0.99, 0.98, 1.0, 2.0, eval_set="e0")
    assert gate_decision(good, 0.6, other)[0] is False  # no comparison run: never promoted blind
    duel = {"win_rate": 0.45, "win_rate_ci_low": 0.38, "win_rate_ci_high": 0.52}
    assert gate_decision(good, 0.6, other, duel)[0] is True  # not shown to be worse
    duel = {"win_rate": 0.30, "win_rate_ci_low": 0.24, "win_rate_ci_high": 0.37}
    passed, reasons = gate_decision(good, 0.6, other, duel)
    assert not passed and "head-to-head vs champion v1: win rate 0.300 [0.240, 0.370] not below 0.5" in reasons[-1]


@pytest.mark.parametrize("diversity, lengths, passed, failing", [
    (0.72, (34.7, 33.0), True, None),  # the demo's β 0.1 policy: diverse, 5 % longer
    (0.46, (36.0, 33.0), False, "fail: distinct-2 0.46 x the reference's vs registry.min_diversity 0.5"),  # round 2
    (0.58, (42.9, 33.0), False, "fail: mean completion length 1.30 x the reference's vs registry.max_length_ratio 1.25"),
])
def test_gate_refuses_a_collapsed_or_padded_policy_with_the_reason(diversity, lengths, passed, failing):
    candidate = {**row("4", 0.1, 0.99, 0.98, 1.0, 5.0), "diversity_ratio": diversity, "length_policy": lengths[0],
                 "length_reference": lengths[1]}
    decision, reasons = gate_decision(candidate, 0.55, min_diversity=0.5, max_length_ratio=1.25)
    assert decision is passed
    assert [r for r in reasons if r.startswith("fail")] == ([failing] if failing else [])
    assert len(reasons) == 5  # win rate, interval, diversity, length, champion


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _model_copy(src, dst, seed):
    """A distinct model folder (other weights) from the tiny model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def _same_weights(src, dst):
    """A copy of a model whose weights are the same tensors in another file (safetensors metadata
    differs): registered as a version of its own, it generates exactly what `src` does."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights_file = dst / "model.safetensors"
    save_file(load_file(weights_file), weights_file, metadata={"format": "pt", "copy": "same tensors"})
    return dst


def _register(model_dir, figures, beta):
    from dpoflow import tracking
    from dpoflow.registry import run_register

    run_id = tracking.start_parent_run("dpoflow", f"beta-{beta}")
    return run_register(model_dir, {**figures, "beta": beta}, {"beta": beta}, model_name="m", run_id=run_id)


def tags_of(version: str) -> dict:
    from dpoflow import mlflow_registry

    return next(v for v in mlflow_registry.model_versions("m") if v["version"] == version)["tags"]


def test_register_select_gate_promote_rollback_in_a_real_store(store, tiny_model_dir):
    from dpoflow import mlflow_registry, tracking
    from dpoflow.registry import rollback, run_gate, run_promote, run_select

    versions = []
    for seed, (beta, win, low, high, kl) in enumerate([(0.1, 0.8, 0.7, 0.87, 3.0), (0.5, 0.82, 0.72, 0.9, 1.5)]):
        figures = {"win_rate": win, "win_rate_ci_low": low, "win_rate_ci_high": high, "kl": kl, "n_prompts": 100,
                   "eval_set_hash": "e1"}
        versions.append(_register(_model_copy(tiny_model_dir, store / f"m{seed}", seed), figures, beta))
    assert versions == ["1", "2"]
    assert mlflow_registry.version_by_alias("m", "candidate")["version"] == "2"
    # the same weights again reuse their version
    assert _register(store / "m0", {"win_rate": 0.8, "win_rate_ci_low": 0.7, "win_rate_ci_high": 0.87, "kl": 3.0,
                                    "n_prompts": 100, "eval_set_hash": "e1"}, 0.1) == "1"
    selected = run_select("m", versions, max_kl=None)
    assert selected == "2"
    tags = mlflow_registry.version_by_alias("m", "candidate")["tags"]
    assert tags["dpoflow.selected"] == "true" and '"beta": 0.1' in tags["dpoflow.sweep"]
    assert run_gate("m", selected, min_win_rate=0.6)
    run_promote("m", selected)
    assert mlflow_registry.version_by_alias("m", "champion")["version"] == "2"

    # a worse challenger on the same eval set: the champion stays, the reasons are tagged
    worse = _register(_model_copy(tiny_model_dir, store / "m3", 3),
                      {"win_rate": 0.62, "win_rate_ci_low": 0.55, "win_rate_ci_high": 0.7, "kl": 1.0, "n_prompts": 100,
                       "eval_set_hash": "e1"}, 1.0)
    assert not run_gate("m", worse, min_win_rate=0.6)
    tags = next(v for v in mlflow_registry.model_versions("m") if v["version"] == worse)["tags"]
    assert tags["dpoflow.gate"] == "fail" and "champion v2 win rate 0.820" in tags["dpoflow.gate_reasons"]
    assert mlflow_registry.version_by_alias("m", "champion")["version"] == "2"

    # a better one is promoted; the old champion keeps previous-champion; rollback swaps them back
    better = _register(_model_copy(tiny_model_dir, store / "m4", 4),
                       {"win_rate": 0.9, "win_rate_ci_low": 0.84, "win_rate_ci_high": 0.94, "kl": 1.0, "n_prompts": 100,
                        "eval_set_hash": "e1"}, 0.3)
    assert run_gate("m", better, min_win_rate=0.6)
    run_promote("m", better)
    assert mlflow_registry.version_by_alias("m", "champion")["version"] == better
    assert mlflow_registry.version_by_alias("m", "previous-champion")["version"] == "2"
    rollback("m")
    assert mlflow_registry.version_by_alias("m", "champion")["version"] == "2"
    assert mlflow_registry.version_by_alias("m", "previous-champion")["version"] == better
    # every version's model card (the registry UI's description) follows its status and decisions
    cards = {v: tracking.client().get_model_version("m", v).description for v in ("2", worse, better)}
    assert "Status: **champion**" in cards["2"] and "win rate 0.820 (95 % interval 0.720–0.900) on 100" in cards["2"]
    assert "- decision: pass" in cards["2"] and "- pass: win rate 0.820 vs registry.min_win_rate 0.6" in cards["2"]
    assert "Status: **candidate**" in cards[worse] and "- decision: fail" in cards[worse]
    assert "- fail: champion v2 win rate 0.820 on the same eval set" in cards[worse]
    assert "Status: **rolled-back**" in cards[better] and "β 0.3" in cards[better]
    assert f"weights sha {tags_of(better)['dpoflow.model_sha']}" in cards[better]
    path = mlflow_registry.download_model("models:/m@champion")
    from dpoflow.modeling import load_model

    assert load_model(path).config.vocab_size > 0


def test_champion_from_another_eval_set_is_judged_head_to_head(store, tiny_model_dir):
    """The champion's figures are for another eval set: the gate samples both models on this run's
    prompts and judges them (real generation, real judge). The challenger has the champion's weights,
    so with the same seeds every completion is the same and every verdict a tie: exactly 1.5 of 3,
    whose Wilson interval (worked by hand) is [0.12533, 0.87467] — not below 0.5, so the gate passes."""
    from dpoflow.config import EvalConfig
    from dpoflow.evaluation.evaluate import head_to_head
    from dpoflow.registry import run_gate, run_promote

    data = store / "data"
    data.mkdir()
    pd.DataFrame({"prompt": ["the film was", "a movie that", "acting is"], "prompt_messages": ["", "", ""]}).to_parquet(
        data / "prompts_eval.parquet")
    old = _register(_model_copy(tiny_model_dir, store / "old", 1),
                    {"win_rate": 0.9, "win_rate_ci_low": 0.8, "win_rate_ci_high": 0.95, "kl": 1.0, "n_prompts": 50,
                     "eval_set_hash": "old-set"}, 0.1)
    run_promote("m", old, force=True)
    new = _register(_same_weights(store / "old", store / "new"),
                    {"win_rate": 0.8, "win_rate_ci_low": 0.7, "win_rate_ci_high": 0.88, "kl": 1.0, "n_prompts": 50,
                     "eval_set_hash": "new-set"}, 0.1)
    cfg = EvalConfig(max_new_tokens=4)
    duels = []

    def duel(champion_version):
        from dpoflow.mlflow_registry import download_model

        result = head_to_head(cfg, download_model(f"models:/m/{new}"), download_model(f"models:/m/{champion_version}"),
                              data)
        duels.append((champion_version, result))
        return result

    decision = run_gate("m", new, min_win_rate=0.6, head_to_head=duel)
    [(against, result)] = duels
    assert against == old
    assert (result["wins"], result["ties"], result["losses"], result["win_rate"]) == (0, 3, 0, 0.5)
    assert result["win_rate_ci_low"] == pytest.approx(0.12533, abs=1e-5)
    assert result["win_rate_ci_high"] == pytest.approx(0.87467, abs=1e-5)
    from dpoflow import mlflow_registry

    tags = next(v for v in mlflow_registry.model_versions("m") if v["version"] == new)["tags"]
    assert f"head-to-head vs champion v{old}: win rate 0.500 [0.125, 0.875] not below 0.5" in tags["dpoflow.gate_reasons"]
    assert decision is True and tags["dpoflow.gate"] == "pass"


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A real MLflow tracking server on loopback (sqlite behind it): what two overlapping runs share."""
    from dpoflow.pipeline.containers import mlflow_server

    monkeypatch.chdir(tmp_path)
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", tmp_path / "server.log") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield url


FIGURES = {"weak": (0.8, 0.7, 0.87), "strong": (0.9, 0.84, 0.94)}


def _two_gated_challengers(root, tiny_model_dir):
    """Champion v1, then two runs' candidates (weak, strong), both gated against v1 and passing: the
    state two overlapping runs reach before either promotes."""
    from dpoflow.registry import run_gate, run_promote

    def register(seed, win, low, high):
        figures = {"win_rate": win, "win_rate_ci_low": low, "win_rate_ci_high": high, "kl": 1.0, "n_prompts": 100,
                   "eval_set_hash": "e1"}
        return _register(_model_copy(tiny_model_dir, root / f"m{seed}", seed), figures, 0.1)

    champion = register(10, 0.7, 0.6, 0.78)
    run_promote("m", champion, force=True, log=lambda *_: None)
    weak, strong = register(11, *FIGURES["weak"]), register(12, *FIGURES["strong"])
    for version in (weak, strong):
        assert run_gate("m", version, min_win_rate=0.6, log=lambda *_: None)
        assert tags_of(version)["dpoflow.gated_against"] == champion
    return champion, weak, strong


def _promote(version):
    from dpoflow.registry import run_gate, run_promote

    return run_promote("m", version, regate=lambda: run_gate("m", version, min_win_rate=0.6, log=lambda *_: None),
                       log=lambda *_: None)


def test_promotion_is_compare_and_set_in_either_order(server, tmp_path, tiny_model_dir):
    """Both runs passed the gate against v1. Whichever promotes second finds the champion moved and
    is gated against the first: the strong one wins in both orders, every decision tagged."""
    from dpoflow import mlflow_registry, tracking

    champion, weak, strong = _two_gated_challengers(tmp_path, tiny_model_dir)
    # the strong run promotes first; the weak one, gated against v1 minutes ago, must not take over
    assert _promote(strong)["promoted"]
    assert _promote(weak) == {"champion": strong, "previous_champion": None, "promoted": False}
    assert mlflow_registry.version_by_alias("m", "champion")["version"] == strong
    assert mlflow_registry.version_by_alias("m", "previous-champion")["version"] == champion
    weak_tags = tags_of(weak)
    assert weak_tags["dpoflow.promote"] == (f"refused: the champion moved from v{champion} to v{strong} and the gate "
                                            "against it did not pass")
    assert weak_tags["dpoflow.gated_against"] == strong and weak_tags["dpoflow.gate"] == "fail"
    assert f"fail: champion v{strong} win rate 0.900 on the same eval set" in weak_tags["dpoflow.gate_reasons"]
    assert tags_of(strong)["dpoflow.promote"] == f"champion v{champion} -> v{strong}"
    assert "- promotion: refused: the champion moved" in tracking.client().get_model_version("m", weak).description

    # the other order on a fresh registry name: the weak one first, then the strong one is gated
    # against it (not against v1) and takes over
    tracking.client().delete_registered_model("m")
    champion, weak, strong = _two_gated_challengers(tmp_path / "again", tiny_model_dir)
    assert _promote(weak)["promoted"]
    assert _promote(strong) == {"champion": strong, "previous_champion": weak, "promoted": True}
    assert tags_of(strong)["dpoflow.gated_against"] == weak
    assert f"pass: champion v{weak} win rate 0.800 on the same eval set" in tags_of(strong)["dpoflow.gate_reasons"]
    assert tags_of(strong)["dpoflow.promote"] == f"champion v{weak} -> v{strong}"


def test_two_processes_promoting_at_once_are_serialised_by_the_alias_lock(server, tmp_path, tiny_model_dir):
    """Two processes promote at the same moment against one server: the lock lets one in at a time, so
    the champion ends as the strong one whatever the order, and the lock is gone after."""
    import subprocess
    import sys

    from dpoflow import mlflow_registry, tracking

    champion, weak, strong = _two_gated_challengers(tmp_path, tiny_model_dir)
    script = ("import json, sys; sys.path.insert(0, {tests!r}); from test_registry import _promote; "
              "print(json.dumps(_promote(sys.argv[1])))").format(tests=str(Path(__file__).parent))
    # the lock is held: both wait (nothing moves) until it is released
    with mlflow_registry.alias_lock("m", holder="this test"):
        racers = [subprocess.Popen([sys.executable, "-c", script, v], stdout=subprocess.PIPE, text=True)
                  for v in (weak, strong)]
        with pytest.raises(subprocess.TimeoutExpired):
            racers[0].wait(timeout=8)
        assert mlflow_registry.version_by_alias("m", "champion")["version"] == champion
    results = [json.loads(r.communicate(timeout=120)[0].strip().splitlines()[-1]) for r in racers]
    assert all(r.returncode == 0 for r in racers)
    assert mlflow_registry.version_by_alias("m", "champion")["version"] == strong
    assert results[1]["promoted"] and results[1]["champion"] == strong
    # the weak one either went first (then was replaced) or found the strong one and was refused
    assert results[0]["promoted"] == (mlflow_registry.version_by_alias("m", "previous-champion")["version"] == weak)
    assert not tracking.client().search_registered_models("name = 'm.alias-lock'")


def test_a_stale_lock_is_broken_and_a_held_one_times_out_naming_its_holder(server):
    from dpoflow import mlflow_registry, tracking

    tracking.client().create_registered_model("m.alias-lock", tags={"holder": "a killed promote"})
    with pytest.raises(mlflow_registry.LockTimeout, match="held by a killed promote"):
        with mlflow_registry.alias_lock("m", holder="me", timeout_s=1.0):
            pass
    with mlflow_registry.alias_lock("m", holder="me", stale_s=0.0):  # its holder is gone: broken, then taken
        assert tracking.client().get_registered_model("m.alias-lock").tags["holder"] == "me"
    assert not tracking.client().search_registered_models("name = 'm.alias-lock'")
