"""Judges for tests (importable by the local runner's task processes through PYTHONPATH)."""


def longer(prompt: str, completion: str) -> float:
    """Prefers longer completions: a preference a tiny model learns in a few DPO steps."""
    return float(len(completion.split()))


def leaky(prompt: str, completion: str) -> float:
    """`longer`, but careless with a credential: prints the judge API key from the environment, as a
    real judge client's debug output might (the redaction filter must keep it out of every record)."""
    import os

    print(f"judge: calling the API with key {os.environ.get('OPENAI_API_KEY')}")
    return longer(prompt, completion)


def broken(prompt: str, completion: str) -> float:
    """Fails on the third item it sees (a judge bug)."""
    broken.calls = getattr(broken, "calls", 0) + 1
    if broken.calls == 3:
        return 1 / 0
    return 0.0


def not_a_number(prompt: str, completion: str) -> float:
    """Returns NaN on the second item it sees (a judge dividing by a zero count, say)."""
    not_a_number.calls = getattr(not_a_number, "calls", 0) + 1
    return float("nan") if not_a_number.calls == 2 else 1.0
