"""Judges for tests (importable by the local runner's task processes through PYTHONPATH)."""


def longer(prompt: str, completion: str) -> float:
    """Prefers longer completions: a preference a tiny model learns in a few DPO steps."""
    return float(len(completion.split()))
