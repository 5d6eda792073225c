"""HF `evaluate` modules shipped with dpoflow, loadable offline by path."""

from pathlib import Path

METRICS_DIR = Path(__file__).parent


def load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))
