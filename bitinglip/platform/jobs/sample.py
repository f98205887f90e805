"""A seeded, English-like sample corpus for demos and benchmarks.

Sentence lengths follow a lognormal word count (median about 16 words, which
is about 20 tokens for a WordPiece tokenizer, with a long tail up to a few
hundred words), and words follow a Zipf-like frequency over a fixed
vocabulary, so that batch shapes look like real text rather than noise.
"""

from __future__ import annotations

import math
import random

_WORDS = (  # noqa: SIM905 - a paragraph reads better than 400 quoted words
    "the of and to in a is that for it as was with be by on not he i this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will what can "
    "more out up other into about time them could some these then two first any like only may its new "
    "data model system user service request job worker cluster memory network batch result value table "
    "company market customer product order price payment account support ticket issue problem error "
    "report team project plan meeting week month year today morning evening people group student school "
    "city country world government policy public health research study paper method analysis number "
    "question answer reason example case point part place home house room door water food family friend "
    "great small large long short high low good bad early late important different possible available "
    "quickly slowly really very often always never sometimes already still again together however "
    "because although while before after during without within between against through across under "
    "make take give find think know want need use work call try ask feel leave keep begin seem help show "
    "hear play run move live believe bring happen write provide sit stand lose pay meet include continue "
    "set learn change lead understand watch follow stop create speak read allow add spend grow open walk "
    "win offer remember love consider appear buy wait serve die send expect build stay fall cut reach "
    "kill remain suggest raise pass sell require decide return explain hope develop carry break receive"
).split()


def sample_corpus(n: int, seed: int = 0, median_words: float = 16.0, max_words: int = 300) -> list[str]:
    """Return ``n`` seeded sentences with a realistic length spread."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** 0.9 for rank in range(len(_WORDS))]
    mu = math.log(median_words)
    out = []
    for _ in range(n):
        k = max(1, min(max_words, int(rng.lognormvariate(mu, 0.75))))
        words = rng.choices(_WORDS, weights=weights, k=k)
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + ".")
    return out


#: what the sample chats ask about, and how: a real chat model gives answers a reader can judge
_TOPICS = ("a Dask cluster", "batch inference", "a hash table", "photosynthesis", "the water cycle", "a database index",
           "compound interest", "a rainbow", "the moon's phases", "a compiler", "vaccines", "a neural network",
           "recycling", "the stock market", "volcanoes", "a bicycle gear", "sleep", "the internet", "tides", "coffee")
_ASKS = ("Explain {t} in two sentences.", "What is {t}? Answer briefly.", "Give one surprising fact about {t}.",
         "How would you describe {t} to a ten-year-old?", "List three words that come to mind for {t}.",
         "Why does {t} matter? One sentence.", "Write a haiku about {t}.", "What is a common mistake about {t}?")
_SYSTEMS = (None, "You are a concise assistant.", "You are a friendly teacher. Keep answers short.")


def sample_chats(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Return ``n`` seeded chats (OpenAI-style message lists: a user
    question, a third of them after a system prompt) for the generation demo."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        system = rng.choice(_SYSTEMS)
        ask = rng.choice(_ASKS).format(t=rng.choice(_TOPICS))
        out.append(([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": ask}])
    return out
