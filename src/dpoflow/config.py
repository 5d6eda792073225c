"""Typed run configuration: one pydantic model per step plus the run.

`params.yaml` at the repository root is the default run (the demo). The CLI, DVC and KFP all load it
with `load_config`, apply `--set a.b=c` overrides with `apply_overrides`, and hash it with
`config_hash`. Every model forbids unknown keys, so a typo is an error that names the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DvcSource(_Strict):
    repo: str = Field(description="git+DVC repository: a local path or a git URL")
    path: str = Field(description="path of the data file or folder inside the repo")
    rev: str | None = Field(None, description="git revision (commit, tag, branch); None = working tree/HEAD")


class DemoConfig(_Strict):
    n_reviews: int = Field(6000, ge=10, description="number of generated reviews")
    seed: int = Field(0, description="seed of the review grammar")


class DataConfig(_Strict):
    kind: Literal["preferences", "sft", "prompts"] = Field(
        "sft", description="what the source holds: preference pairs, an SFT corpus, or prompts only"
    )
    source: str = Field(
        "demo", description="'demo' (generated corpus), a local file/folder, or 'hub:<id>' (online only)"
    )
    dvc: DvcSource | None = Field(None, description="read `source` from a DVC repo at a revision instead")
    format: Literal["auto", "standard", "implicit", "conversational"] = Field(
        "auto", description="preference format; auto = detected per row"
    )
    mode: Literal["strict", "quarantine"] = Field(
        "strict", description="strict: fail on any bad row; quarantine: set bad rows aside with a reason"
    )
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of prompts held out (by hash)")
    max_prompt_tokens: int = Field(1024, gt=0, description="longest allowed prompt in tokens")
    tokenizer: str | None = Field(None, description="tokenizer dir for max_prompt_tokens; None = the base "
                                  "model's when it is a folder, else estimated at 4 characters a token")
    prompt_words: tuple[int, int] = Field(
        (2, 8), description="for an SFT corpus: prompts are review openings of this many words"
    )
    demo: DemoConfig = DemoConfig()

    @model_validator(mode="after")
    def _check_words(self) -> DataConfig:
        low, high = self.prompt_words
        if not 1 <= low <= high:
            raise ValueError(f"prompt_words must be [min, max] with 1 <= min <= max, got {list(self.prompt_words)}")
        return self


class ModelConfig(_Strict):
    base: str | None = Field(None, description="base model: local dir, .gguf file, hub id or models:/name@alias; None = build")
    preset: Literal["tiny", "small"] = Field("small", description="size of a from-scratch model (base: null)")
    vocab_size: int = Field(2000, ge=300, description="BPE vocabulary of a from-scratch tokenizer")
    allow_pickle: bool = Field(False, description="allow non-safetensors weights (runs pickle: trusted files only)")
    trust_remote_code: bool = Field(False, description="allow model code from the checkpoint")
    policy_init: str | None = Field(None, description="DPO starts from this policy (dir or models:/name@champion) "
                                    "and round 1 samples its pairs from it; the reference stays fixed; None = the "
                                    "reference")


class LoraConfig(_Strict):
    enabled: bool = Field(False, description="train LoRA adapters instead of all weights")
    r: int = Field(8, gt=0, description="adapter rank")
    alpha: int = Field(16, gt=0, description="adapter scaling numerator")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="adapter dropout")
    target_modules: list[str] = Field(["q_proj", "v_proj"], description="module names that get adapters")


class OptimConfig(_Strict):
    optimizer: Literal["adamw", "rmsprop"] = Field("adamw", description="adamw, or rmsprop as in the DPO paper")
    learning_rate: float = Field(5e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="schedule after warm-up")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    per_device_batch_size: int = Field(8, gt=0, description="pairs (or sequences) per device per micro-step")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-steps per optimizer step")
    max_steps: int = Field(100, gt=0, description="optimizer steps")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory")
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint every N steps (0 = never)")
    log_every: int = Field(1, gt=0, description="write metrics every N steps")
    seed: int = Field(0, description="seed of data order and init")


class SftConfig(OptimConfig):
    enabled: bool = Field(True, description="fine-tune the base first; false = the base is the reference")
    max_length: int = Field(128, gt=1, description="longest training sequence in tokens")


class DpoConfig(OptimConfig):
    beta: float = Field(0.1, gt=0, description="KL strength β (one run); run.betas sweeps it")
    loss_type: Literal["sigmoid", "cdpo", "robust", "hinge", "ipo"] = Field("sigmoid", description="DPO loss variant")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="ε for cdpo/robust")
    rpo_alpha: float = Field(0.0, ge=0.0, description="weight of the chosen-NLL term (RPO); 0 = off")
    max_length: int = Field(128, gt=1, description="longest prompt+completion in tokens")
    truncation: Literal["keep_start", "error"] = Field("keep_start", description="what to do with longer pairs")
    reference: Literal["cached", "live", "lora_disabled"] = Field(
        "cached", description="cached log-probs (default), a live frozen copy, or the LoRA base (adapters off)"
    )
    prefix_sharing: bool = Field(True, description="encode the prompt once for chosen and rejected (fastest: "
                                 "see bench/README.md); false = the concatenated chosen+rejected forward")
    packing: bool = Field(True, description="prefix sharing: every pair of a micro-batch in one row with no "
                          "padding, attention computed pair by pair (block attention, lm/blocks.py; a dense block mask "
                          "over packed rows for models that need more than a causal mask); same math; false = one "
                          "pair per row")
    max_forward_tokens: int | None = Field(
        None, ge=0, description="a micro-batch with more tokens runs as balanced parts of at most this many (same "
        "update, less activation memory); 0 = no cut; null = auto: one forward whenever its activations fit the "
        "activation budget (src/dpoflow/memory.py), else the fewest parts that do")
    reference_update: Literal["fixed", "previous"] = Field(
        "fixed", description="run.rounds > 1: the reference of round r is the fixed one, or round r-1's policy")
    nodes: int = Field(1, ge=1, description="nodes that train each β: > 1 runs DPO as a Kubeflow Trainer TrainJob "
                       "(torchrun on every node, inputs and output on the shared volume); 1 = in the step's own process")
    lora: LoraConfig = LoraConfig()


class PrefsConfig(_Strict):
    enabled: bool = Field(True, description="generate pairs from the reference; false = data holds pairs")
    judge: str = Field("demo", description="scores samples: demo (VADER, demo data only) | callable:<mod>:<fn> | "
                       "reward_model:<dir|models:/> | llm")
    k: int = Field(4, ge=2, description="samples per prompt; best vs worst become a pair")
    min_gap: float = Field(0.1, ge=0.0, description="smallest judge-score gap kept as a pair")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens only; 0 = all")
    max_new_tokens: int = Field(48, gt=0, description="longest sampled completion")
    max_prompts: int = Field(100000, gt=0, description="cap on training prompts used")
    max_eval_prompts: int = Field(100000, gt=0, description="cap on held-out prompts used for eval pairs")
    seed: int = Field(0, description="sampling seed")


class LLMJudgeConfig(_Strict):
    base_url: str | None = Field(None, description="OpenAI-compatible API root, e.g. http://host:8000/v1")
    model: str | None = Field(None, description="judge model name")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    template: str = Field(
        "Which completion of the prompt is better? Answer with exactly '1' or '2'.\n\nPrompt: {prompt}\n\n"
        "Completion 1: {first}\n\nCompletion 2: {second}", description="prompt with {prompt} {first} {second}")
    max_retries: int = Field(3, ge=0, description="retries per item (exponential backoff)")
    backoff_s: float = Field(1.0, ge=0, description="first backoff delay in seconds")
    timeout_s: float = Field(60.0, gt=0, description="per-request timeout")
    seed: int = Field(0, description="seed of the per-item A/B order")


class EvalConfig(_Strict):
    judge: str = Field("demo", description="demo (VADER, demo data only) | callable:<mod>:<fn> | "
                       "reward_model:<dir|models:/> | llm")
    llm_judge: LLMJudgeConfig = LLMJudgeConfig()
    max_prompts: int = Field(1000, gt=0, description="held-out prompts evaluated")
    temperature: float = Field(0.7, ge=0.0, description="sampling temperature for both models (0 = greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens only; 0 = all")
    max_new_tokens: int = Field(48, gt=0, description="longest completion")
    seed: int = Field(0, description="sampling seed, the same for policy and reference")


class TrackingConfig(_Strict):
    enabled: bool = Field(True, description="log `dpoflow run` to MLflow (MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")
    experiment: str = Field("dpoflow", description="MLflow experiment (unless MLFLOW_EXPERIMENT_ID is set)")
    flush_every_s: float = Field(5.0, gt=0, description="send buffered training metrics to MLflow this often")
    system_metrics: bool = Field(True, description="log CPU/RSS (and GPU) metrics of training steps")


class RegistryConfig(_Strict):
    enabled: bool = Field(True, description="register every β's policy in the MLflow model registry")
    model_name: str = Field("dpoflow-demo", description="registered model name")
    min_win_rate: float = Field(0.55, ge=0.0, le=1.0, description="gate: least win rate vs the reference")
    max_kl: float | None = Field(None, gt=0, description="select: ignore candidates above this KL (None = no budget)")
    min_diversity: float = Field(0.5, ge=0.0, description="gate: least distinct-2 of the candidate's samples, as a "
                                 "fraction of the reference's (a policy that collapsed onto what the judge likes)")
    max_length_ratio: float | None = Field(1.25, gt=0, description="gate: most mean completion length, as a multiple "
                                           "of the reference's (longer answers are a known way to win a judge); "
                                           "null = no check")


class RunConfig(_Strict):
    name: str = Field("demo", description="run name: outputs go to <output_dir>/<name>")
    output_dir: str = Field("outputs", description="root folder of step outputs")
    seed: int = Field(0, description="global seed")
    betas: list[float] = Field([0.1], min_length=1, description="β values swept by `dpoflow run`")
    rounds: int = Field(1, ge=1, le=20, description="on-policy rounds: round r samples pairs from round r-1's policy "
                        "(its share of the training prompts), judges them and trains on from that policy")
    min_diversity: float = Field(0.5, ge=0.0, description="stop iterating when a round's policy samples fall below "
                                 "this fraction of the reference's distinct-2 (judge exploitation guard)")


class Config(_Strict):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    sft: SftConfig = SftConfig()
    prefs: PrefsConfig = PrefsConfig()
    dpo: DpoConfig = DpoConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()

    @model_validator(mode="after")
    def _no_credentials(self):
        """A config is written into MLflow params, logs, reports and the compiled pipeline: a
        credential in it would leak. They come from the environment (Kubernetes Secrets on a cluster)."""
        from dpoflow.redact import found_secrets, register_secret_env

        register_secret_env(self.eval.llm_judge.api_key_env)
        found = found_secrets(self.model_dump(mode="json"))
        if found:
            raise ValueError(f"{', '.join(found)} holds what looks like a credential (a URL password or an API token). "
                             "The config is recorded in MLflow, logs and the compiled pipeline: pass credentials "
                             "through environment variables instead (MLFLOW_TRACKING_USERNAME/PASSWORD, "
                             "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, git/DVC credential helpers, the variable "
                             "named by eval.llm_judge.api_key_env; on a cluster the pipeline maps them from Secrets)")
        return self


def check_pipeline(cfg: Config) -> None:
    """The step combinations `dpoflow run` can execute; each message says which keys to change."""
    problems = []
    if cfg.sft.enabled and cfg.data.kind != "sft":
        problems.append(f"sft.enabled needs an SFT corpus but data.kind is {cfg.data.kind!r}: set "
                        "sft.enabled=false and model.base to the reference model")
    if not cfg.sft.enabled and cfg.model.base is None:
        problems.append("sft.enabled=false makes model.base the reference: set model.base")
    if cfg.data.kind == "preferences" and cfg.prefs.enabled:
        problems.append("data.kind=preferences already holds pairs: set prefs.enabled=false")
    if cfg.data.kind != "preferences" and not cfg.prefs.enabled:
        problems.append(f"data.kind={cfg.data.kind!r} holds no pairs: prefs.enabled must be true "
                        "(or point data at preference pairs)")
    own_data = cfg.data.source != "demo" or cfg.data.dvc is not None
    for section, judge in (("eval", cfg.eval.judge), ("prefs", cfg.prefs.judge if cfg.prefs.enabled else None)):
        if own_data and judge == "demo":
            problems.append(f"{section}.judge is 'demo' (VADER sentiment, the demo's ground truth) but the data is "
                            f"your own: choose the judge explicitly: {section}.judge=callable:<module>:<function>, "
                            f"reward_model:<dir or models:/...> or llm (see configs/examples/)")
    if cfg.data.eval_fraction == 0:
        problems.append("data.eval_fraction=0 holds out no prompts, but every run is evaluated on held-out prompts: "
                        "set data.eval_fraction above 0 (e.g. 0.1)")
    if cfg.run.rounds > 1 and not cfg.prefs.enabled:
        problems.append("run.rounds > 1 samples new pairs each round: it needs prefs.enabled=true and a prompt or "
                        "SFT corpus (data.kind prompts or sft) and a prefs.judge")
    if cfg.registry.enabled and not cfg.tracking.enabled:
        problems.append("registry.enabled needs MLflow: set tracking.enabled=true or registry.enabled=false")
    if problems:
        raise ConfigError("config cannot run as a pipeline:\n  " + "\n  ".join(problems))


def _format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; `dpoflow config show` lists valid keys)")
        elif not item["loc"]:  # a rule over the whole config: the message names the keys
            lines.append(f"  {item['msg']}")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    from dpoflow.redact import redact

    return redact("\n".join(lines))


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (`3` -> int, `true` -> bool, `[1,2]` -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to a raw config dict; unknown keys are caught by validation later."""
    result = json.loads(json.dumps(raw))
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key.path=value")
        key, value = override.split("=", 1)
        parts = key.strip().split(".")
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return result


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Load and validate a config file (None or a missing default file = all defaults)."""
    raw: dict = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        if path.exists():
            origin = str(path)
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as error:
                where = getattr(error, "problem_mark", None)
                at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
                raise ConfigError(f"{path} is not valid YAML{at}: {getattr(error, 'problem', None) or error}. A dpoflow "
                                  "config is a YAML mapping of sections like params.yaml (`dpoflow config show` "
                                  "prints one)") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{path} is not a text file: a dpoflow config is YAML like params.yaml") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
        elif str(path) != "params.yaml":
            raise ConfigError(f"config file {path} does not exist")
    if overrides:
        raw = apply_overrides(raw, overrides)
        origin += " + --set " + " ".join(overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, origin)) from None


def config_dict(config: BaseModel) -> dict:
    return config.model_dump(mode="json")


def config_hash(config: BaseModel) -> str:
    """Stable hash of a resolved config: same values => same hash, whatever the key order."""
    canonical = json.dumps(config_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form MLflow params and DVC params use."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
