"""Serving a registered policy: every version's folder is a `save_pretrained` folder (plain
transformers loads it) and an MLflow pyfunc model at once, so

    mlflow models serve -m models:/<name>@champion --env-manager local

answers generation requests: POST /invocations {"dataframe_records": [{"prompt": "..."}],
"params": {"max_new_tokens": 32, "temperature": 0.7}} -> {"predictions": [{"completion": "..."}]}.
A chat model answers chat requests the same way: {"dataframe_records": [{"messages": [{"role":
"user", "content": "..."}]}]} -> the assistant's reply, the model's own chat template applied here,
on the server (the generation prompt added; the reply ends at the template's end-of-turn token).

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
    from mlflow.types.schema import Array, Object, Property

    folder = Path(tempfile.mkdtemp(prefix="dpoflow-pyfunc-"))
    message = Object([Property("role", "string"), Property("content", "string")])
    model = Model(signature=ModelSignature(
        inputs=Schema([ColSpec("string", "prompt", required=False), ColSpec(Array(message), "messages", required=False)]),
        outputs=Schema([ColSpec("string", "completion")]),
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
        prompts, messages = self._requests(frame)
        samples = sample_completions(self.model, self.tokenizer, prompts, prompt_messages=messages, num_samples=1,
                                     temperature=float(settings["temperature"]), top_p=float(settings["top_p"]),
                                     top_k=int(settings["top_k"]), max_new_tokens=int(settings["max_new_tokens"]),
                                     seed=int(settings["seed"]))
        return pd.DataFrame({"completion": [completions[0] for completions in samples]})

    def _requests(self, frame) -> tuple[list[str], list[str]]:
        """Each row's prompt text and its chat messages as JSON ('' for a plain prompt)."""
        import json

        if "prompt" not in frame and "messages" not in frame:
            raise ValueError(f"requests need a 'prompt' or a 'messages' column; got columns {list(frame.columns)}")
        prompts, messages = [], []
        for number, row in enumerate(frame.to_dict(orient="records"), start=1):
            chat = row.get("messages")
            chat = None if chat is None or (isinstance(chat, float) and chat != chat) else chat  # NaN: not given
            if chat is not None:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ValueError(f"request row {number} sends messages, but this model has no chat template: "
                                     "send a 'prompt' instead")
                chat = [dict(m) for m in chat]
                if not chat or chat[-1].get("role") == "assistant":
                    raise ValueError(f"request row {number}: messages must end with a user (or system) turn for "
                                     "the assistant to answer")
                prompts.append(str(chat[-1].get("content", "")))
                messages.append(json.dumps(chat))
            elif row.get("prompt") is not None:
                prompts.append(str(row["prompt"]))
                messages.append("")
            else:
                raise ValueError(f"request row {number} has neither a prompt nor messages")
        return prompts, messages
