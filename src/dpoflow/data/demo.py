"""The demo corpus: short movie reviews generated from a seeded grammar.

A miniature of the DPO paper's IMDb controlled-sentiment experiment (Rafailov et al. 2023, sec. 6.1):
reviews serve as the SFT corpus, review openings as prompts, and VADER compound sentiment as the
ground-truth reward. Adjectives are hand-picked to read naturally in a review and then checked
against the VADER lexicon that ships with `vadersentiment`, so their polarity is the judge's own.
The same seed always gives the same corpus.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

# Candidates, read naturally after "the plot was ..."; polarity is taken from the VADER lexicon.
_ADJECTIVE_CANDIDATES = ["great", "wonderful", "brilliant", "beautiful", "charming", "clever", "stunning", "strong", "fun", "funny", "delightful", "superb", "excellent", "lovely", "gorgeous", "fresh", "honest", "perfect", "fantastic", "amazing", "sweet", "hilarious", "original", "impressive", "awesome", "enjoyable", "entertaining", "inspiring", "warm", "exciting", "smart", "powerful", "touching", "fascinating", "magnificent", "awful", "terrible", "boring", "dull", "weak", "horrible", "stupid", "annoying", "painful", "confusing", "disappointing", "ugly", "pathetic", "lame", "poor", "dumb", "messy", "bad", "sad", "cheap", "tiresome", "lousy", "awkward", "long", "quiet", "slow", "dark", "simple", "loud", "familiar", "short", "busy", "steady", "modern", "classic"]  # noqa: E501
_NOUN_PHRASES = (
    "movie", "film", "story", "plot", "script", "cast", "acting", "ending", "soundtrack", "dialogue",
    "direction", "pacing", "camera work", "lead actor", "villain", "score", "first half", "finale",
)
_INTENSIFIERS = ("", "", "", "really ", "very ", "quite ", "truly ", "rather ", "so ")
_OPENINGS = (
    "I watched this {noun} last night and",
    "My friends and I saw this {noun}, and",
    "After all the hype,",
    "Honestly,",
    "I went in with low expectations, and",
    "From the first scene,",
    "This is one of those films where",
    "I have to say that",
    "Watching it again,",
    "On the whole,",
)
_SENTENCES = (
    "the {noun} was {adv}{adj}.",
    "the {noun} felt {adv}{adj} and the {noun2} was {adj2}.",
    "I thought the {noun} was {adv}{adj}.",
    "The {noun} is {adv}{adj}, but the {noun2} is {adj2}.",
    "It was a {adv}{adj} {noun2}.",
    "The {noun} was {adj} from start to finish.",
    "Everyone in the theater found the {noun} {adv}{adj}.",
    "What a {adj} {noun}!",
    "The {noun} made the whole thing {adv}{adj}.",
    "I would call the {noun} {adv}{adj}.",
)
_ENDINGS = (
    "I would {verb} it to anyone.",
    "Overall, a {adj} experience.",
    "{rating} out of ten.",
    "I {feel} it.",
    "It is {adv}{adj}, all things considered.",
)


@lru_cache(maxsize=1)
def vader_polarity_lists() -> dict[str, tuple[str, ...]]:
    """Split the candidate adjectives into positive / negative / neutral by the VADER lexicon."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lexicon = SentimentIntensityAnalyzer().lexicon
    positive = tuple(w for w in _ADJECTIVE_CANDIDATES if lexicon.get(w, 0.0) >= 1.2)
    negative = tuple(w for w in _ADJECTIVE_CANDIDATES if lexicon.get(w, 0.0) <= -1.0)
    neutral = tuple(w for w in _ADJECTIVE_CANDIDATES if w not in lexicon)
    return {"positive": positive, "negative": negative, "neutral": neutral}


def _adjective(rng: random.Random, lists: dict, polarity: float) -> str:
    """Pick an adjective: positive with probability `polarity`, else negative; sometimes neutral."""
    if rng.random() < 0.2:
        return rng.choice(lists["neutral"])
    return rng.choice(lists["positive"] if rng.random() < polarity else lists["negative"])


def _fill(template: str, rng: random.Random, lists: dict, polarity: float) -> str:
    nouns = rng.sample(_NOUN_PHRASES, 2)
    positive = rng.random() < polarity
    return template.format(
        noun=nouns[0],
        noun2=nouns[1],
        adv=rng.choice(_INTENSIFIERS),
        adj=_adjective(rng, lists, polarity),
        adj2=_adjective(rng, lists, polarity),
        verb="recommend" if positive else rng.choice(("not recommend", "never recommend")),
        feel=rng.choice(("loved", "enjoyed", "liked")) if positive else rng.choice(("hated", "disliked")),
        rating=rng.choice(("Eight", "Nine", "Ten")) if positive else rng.choice(("Two", "Three", "One")),
    )


def generate_review(rng: random.Random) -> str:
    """One review: an opening clause, 1-3 body sentences and an ending, with one overall polarity.

    The polarity (probability of a positive word) is drawn per review from a wide distribution, so
    the corpus holds glowing, scathing and mixed reviews, as IMDb does.
    """
    lists = vader_polarity_lists()
    polarity = rng.choice((0.05, 0.2, 0.5, 0.8, 0.95))
    opening = rng.choice(_OPENINGS).format(noun=rng.choice(("movie", "film")))
    first = _fill(rng.choice(_SENTENCES[:4]), rng, lists, polarity)
    parts = [f"{opening} {first}"]
    for _ in range(rng.randint(1, 3)):
        parts.append(_fill(rng.choice(_SENTENCES[3:]), rng, lists, polarity))
    parts.append(_fill(rng.choice(_ENDINGS), rng, lists, polarity))
    text = re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", " ".join(parts))
    return text[0].upper() + text[1:]


def generate_reviews(n_reviews: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [generate_review(rng) for _ in range(n_reviews)]
