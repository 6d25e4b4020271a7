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


