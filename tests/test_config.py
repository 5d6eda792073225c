from pathlib import Path

import pytest
import yaml

from dpoflow.config import Config, ConfigError, config_hash, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_loads_and_documents_every_key():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.data.source == "demo"
    # every key in params.yaml carries a one-line comment (no config that drifts silently from the code)
    for line in (ROOT / "params.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in stripped, f"params.yaml line without a comment: {line!r}"
    # and params.yaml sets every field the models define (defaults and file cannot drift apart)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(flatten(raw)) >= {k for k in flatten(Config().model_dump(mode="json")) if not k.startswith("data.dvc")}


def test_override_is_typed():
    cfg = load_config(ROOT / "params.yaml", ["data.eval_fraction=0.25", "data.demo.n_reviews=50"])
    assert cfg.data.eval_fraction == 0.25 and cfg.data.demo.n_reviews == 50


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.evl_fraction: unknown key"):
        load_config(None, ["data.evl_fraction=0.2"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"data\.eval_fraction: Input should be a valid number"):
        load_config(None, ["data.eval_fraction=lots"])
    with pytest.raises(ConfigError, match=r"data\.mode: Input should be 'strict' or 'quarantine'"):
        load_config(None, ["data.mode=lenient"])


def test_missing_explicit_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_hash_is_stable_and_sensitive():
    a = load_config(None)
    b = load_config(None, ["data.mode=strict"])  # same value as the default
    c = load_config(None, ["data.mode=quarantine"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_pipeline_combinations_are_checked():
    from dpoflow.config import check_pipeline

    check_pipeline(load_config(ROOT / "params.yaml"))
    with pytest.raises(ConfigError, match="set sft.enabled=false and model.base") as error:
        check_pipeline(load_config(None, ["data.kind=preferences"]))
    assert "set prefs.enabled=false" in str(error.value)
    with pytest.raises(ConfigError, match="makes model.base the reference: set model.base"):
        check_pipeline(load_config(None, ["sft.enabled=false"]))


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "configs/examples").glob("*.yaml")))
def test_example_configs_load_and_can_run_as_a_pipeline(example):
    from dpoflow.config import check_pipeline, load_config

    cfg = load_config(ROOT / "configs/examples" / example)
    check_pipeline(cfg)
    # own data: the judge is chosen explicitly; the demo's reviews (the real-model experiment) keep their judge
    assert cfg.eval.judge != "demo" if cfg.data.source != "demo" else example == "smollm2_sentiment.yaml"


def test_own_data_with_the_demo_judge_is_refused():
    from dpoflow.config import ConfigError, check_pipeline, load_config

    cfg = load_config(None, ["data.kind=preferences", "data.source=pairs.jsonl", "sft.enabled=false",
                             "model.base=m", "prefs.enabled=false"])
    with pytest.raises(ConfigError, match="eval.judge is 'demo' .* choose the judge explicitly"):
        check_pipeline(cfg)
