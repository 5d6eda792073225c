"""Serving a registered policy: every version's folder is a `save_pretrained` folder (plain
transformers loads it) and an MLflow pyfunc model at once, so

    mlflow models serve -m models:/<name>@champion --env-manager local

answers generation requests: POST /invocations {"dataframe_records": [{"prompt": "..."}],
"params": {"max_new_tokens": 32, "temperature": 0.7}} -> {"predictions": [{"completion": "..."}]}.

The pyfunc flavor is a loader module (this one) over the same files, not MLflow's transformers
flavor: that one saves its own copy of the weights in its own layout and needs a pipeline task,
while this keeps one set of files for both readers and samples with dpoflow's own decode loop (the
one evaluation measured). The MLmodel file carries a signature (prompts in, completions out,
generation settings as params with their defaults) and an input example.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

# generation settings a request may set (`params`), with the defaults evaluation samples with
PARAMS = {"max_new_tokens": 48, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "seed": 0}


def pyfunc_files() -> Path:
    """A folder with the MLmodel file and input example that make a save_pretrained folder servable
    (logged next to the weights at registration)."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import Model, ModelSignature
    from mlflow.models.utils import _save_example
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    folder = Path(tempfile.mkdtemp(prefix="dpoflow-pyfunc-"))
    model = Model(signature=ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string", "completion")]),
        params=ParamSchema([ParamSpec(key, "long" if isinstance(value, int) else "double", value)
                            for key, value in PARAMS.items()])))
    mlflow.pyfunc.add_to_model(model, loader_module="dpoflow.serving", data=".")
    _save_example(model, pd.DataFrame({"prompt": ["The film was"]}), str(folder))
    model.save(str(folder / "MLmodel"))
    return folder


def _load_pyfunc(path: str) -> Policy:
    """MLflow's entry point for the loader-module flavor: `path` is the version's folder."""
    return Policy(path)


class Policy:
    """A registered policy answering prompts with sampled completions."""

    def __init__(self, path: str):
        from dpoflow.modeling import load_model, load_tokenizer

        self.model, self.tokenizer = load_model(path).eval(), load_tokenizer(path)

    def predict(self, model_input, params: dict | None = None):
        import pandas as pd

        from dpoflow.generation import sample_completions

        unknown = set(params or {}) - set(PARAMS)
        if unknown:
            raise ValueError(f"unknown generation params {sorted(unknown)}; known: {sorted(PARAMS)}")
        settings = {**PARAMS, **(params or {})}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in frame:
            raise ValueError(f"requests need a 'prompt' column; got columns {list(frame.columns)}")
        samples = sample_completions(self.model, self.tokenizer, [str(p) for p in frame["prompt"]], num_samples=1,
                                     temperature=float(settings["temperature"]), top_p=float(settings["top_p"]),
                                     top_k=int(settings["top_k"]), max_new_tokens=int(settings["max_new_tokens"]),
                                     seed=int(settings["seed"]))
        return pd.DataFrame({"completion": [completions[0] for completions in samples]})
