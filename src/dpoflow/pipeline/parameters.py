"""The pipeline's parameters: the flat, typed ones the Kubeflow UI shows, and how they (with the
base config and `config_overrides`) resolve into one validated run config."""

from __future__ import annotations

import json

from dpoflow.config import Config, ConfigError, apply_overrides, check_pipeline, config_dict, flatten

# pipeline parameter -> config key. The UI shows these flat, typed parameters; everything else is
# reachable through `config_overrides` (a JSON object of dotted keys), validated like params.yaml.
FLAT_PARAMETERS = {
    "base_model": "model.base", "data_kind": "data.kind", "data_source": "data.source",
    "betas": "run.betas", "loss_type": "dpo.loss_type", "learning_rate": "dpo.learning_rate",
    "max_steps": "dpo.max_steps", "judge": "eval.judge", "min_win_rate": "registry.min_win_rate",
    "model_name": "registry.model_name", "dpo_nodes": "dpo.nodes",
}


def resolve_config(config_json: str, flat: dict, overrides_json: str = "{}", dvc: tuple[str, str, str] = ("", "", "")
                   ) -> Config:
    """The run's config: the base config (params.yaml as JSON), then the flat pipeline parameters
    (an empty string keeps the base value), then `config_overrides`; validated like params.yaml, so a
    wrong key fails here with the key's name. `dvc` = (repo, path, rev): read the data through DVC."""
    raw = json.loads(config_json or "{}")
    settings = [f"{FLAT_PARAMETERS[name]}={json.dumps(value)}" for name, value in flat.items()
                if value not in ("", None)]
    repo, path, rev = dvc
    if repo:
        dvc_source = {"repo": repo, "path": path or raw.get("data", {}).get("source"), "rev": rev or None}
        settings.append(f"data.dvc={json.dumps(dvc_source)}")
    try:
        overrides = json.loads(overrides_json or "{}")
    except json.JSONDecodeError as error:
        raise ConfigError(f"config_overrides is not JSON: {error}") from None
    if not isinstance(overrides, dict):
        raise ConfigError('config_overrides must be a JSON object of dotted keys, e.g. {"dpo.max_steps": 200}')
    settings += [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    from pydantic import ValidationError

    from dpoflow.config import _format_validation_error

    try:
        cfg = Config.model_validate(apply_overrides(raw, settings))
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, "pipeline parameters")) from None
    check_pipeline(cfg)
    return cfg


def config_json(cfg: Config) -> str:
    """The one serialization of a run's config that the pipeline's tasks pass on (tasks.run_config)."""
    return json.dumps(config_dict(cfg), sort_keys=True)


def pipeline_arguments(cfg: Config) -> dict:
    """The pipeline's arguments that reproduce `cfg` (the compiled defaults come from params.yaml)."""
    flat = flatten(config_dict(cfg))
    arguments = {name: flat[key] for name, key in FLAT_PARAMETERS.items()}
    arguments["base_model"] = arguments["base_model"] or ""
    arguments["config"] = config_json(cfg)
    return arguments

