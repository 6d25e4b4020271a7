"""Random but word-like English for tests: passes the quality rules without repeating n-grams."""

import random

NOUNS = ["river", "garden", "letter", "window", "teacher", "market", "harbour", "engine", "story", "bridge",
         "winter", "lantern", "village", "machine", "student", "forest", "kitchen", "journey", "mirror", "island"]
VERBS = ["carries", "remembers", "builds", "follows", "watches", "changes", "opens", "describes", "finds", "keeps"]


WORDS = NOUNS + VERBS + ["quiet", "early", "golden", "narrow", "ancient", "bright", "gentle", "famous",
                         "across", "beneath", "slowly", "again", "because", "while", "before", "after"]
STOP = ["the", "of", "and", "to", "with", "that", "have", "be"]


def prose(seed, sentences=40):
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(STOP) if rng.random() < 0.35 else rng.choice(WORDS) for _ in range(rng.randint(8, 14))]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines)




def markov(seed, words=500, successors=5):
    """Text from a fixed first-order Markov chain over WORDS (+ stop words): each word has a few
    likely successors, so a model can learn far more than the unigram distribution."""
    vocab = WORDS + STOP
    chain_rng = random.Random(12345)  # the same chain for every document
    chain = {w: chain_rng.sample(vocab, successors) for w in vocab}
    rng = random.Random(seed)
    word, out = rng.choice(vocab), []
    for i in range(words):
        out.append(word)
        word = rng.choice(chain[word])
    lines = [" ".join(out[i:i + 12]).capitalize() + "." for i in range(0, len(out), 12)]
    return "\n".join(lines)


CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo", "Peru": "Lima",
            "Kenya": "Nairobi", "Chile": "Santiago", "Norway": "Oslo", "Cuba": "Havana", "Ghana": "Accra", "Nepal": "Kathmandu"}


def chat(seed, turns=4):
    """A User/Bot conversation of capital-city questions (each answer follows from its question)."""
    rng = random.Random(seed)
    lines = [f"User: Hello, I am {rng.choice(NOUNS).capitalize()}.\nBot: Hello! How can I help?"]
    for country in rng.sample(sorted(CAPITALS), turns):
        lines.append(f"User: What is the capital of {country}?\nBot: The capital of {country} is {CAPITALS[country]}.")
    return "\n".join(lines)


def code(seed, functions=8):
    rng = random.Random(seed)
    return "\n".join(f"def {rng.choice(NOUNS)}_{j}(x, y):\n    return x * {rng.randint(2, 99)} + y - {rng.randint(1, 9)}\n"
                     for j in range(functions))


def domain_docs(n=30):
    """jsonl records of three domains, for data/prepare.py --input docs.jsonl."""
    return ([{"id": f"p{i}", "text": markov(100 + i), "domain": "prose"} for i in range(n)]
            + [{"id": f"c{i}", "text": chat(i), "domain": "chat"} for i in range(n)]
            + [{"id": f"k{i}", "text": code(i), "domain": "code"} for i in range(n)])
