"""RULER's single-needle tasks S-NIAH-1/2/3 (`niah_single_1/2/3`), generated as RULER's
`scripts/data/synthetic/niah.py` (April-2024 logic) does, with lengths measured in UTF-8 bytes.

The assets (essay haystack, word lists) are read from a folder given at run time, laid out as
../shared/data/ruler_niah (PaulGrahamEssays.json, wonderwords_adjectivelist.txt,
wonderwords_nounlist.txt); nothing of them is copied into this package.

Byte-level adaptation (docs/training.md, "Evaluation"):
- The tokenizer is UTF-8: a prompt's length is its byte count, and 128 bytes are generated.
- RULER grows the haystack in steps sized for subword tokens and windows of 4K tokens and more
  (500 essay words, 25 noise lines, 5 below 4,096 tokens). In bytes such steps would leave up to
  half of a window empty, or overflow it (500 essay words are about 2,900 bytes, more than a
  1,024-byte window), so the steps are ESSAY_STEP = 50 words and NOISE_STEP = 1 line.
- NLTK's punkt sentence splitter is replaced by a split after ., ! or ? (optionally followed by a
  closing quote or bracket) and whitespace; it only moves the candidate needle positions.
- A length too short for the template and one haystack step is an error (RULER loops forever).
"""
import bisect
import json
import random
import re
import uuid
from pathlib import Path
from typing import NamedTuple

TASKS = ("niah_single_1", "niah_single_2", "niah_single_3")
_TASK_TYPES = {                               # haystack, key type, value type (RULER synthetic.yaml)
    "niah_single_1": ("noise", "words", "numbers"),
    "niah_single_2": ("essay", "words", "numbers"),
    "niah_single_3": ("essay", "words", "uuids"),
}
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to "
            "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all "
            "the special magic {type_needle_v} for {query} mentioned in the provided text? The special "
            "magic {type_needle_v} for {query} mentioned in the provided text are")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [0, 3, 5, 8, 10, 13, 15, 18, 21, 23, 26, 28, 31, 33, 36, 38, 41, 44, 46, 49,
          51, 54, 56, 59, 62, 64, 67, 69, 72, 74, 77, 79, 82, 85, 87, 90, 92, 95, 97, 100]
#        = np.round(np.linspace(0, 100, 40)).astype(int), RULER's needle depths in percent
TOKENS_TO_GENERATE = 128
SEED = 42
ESSAY_STEP, NOISE_STEP = 50, 1
ASSET_FILES = ("PaulGrahamEssays.json", "wonderwords_adjectivelist.txt", "wonderwords_nounlist.txt")


class Assets(NamedTuple):
    """The essay as RULER's word list, and the sorted adjective-noun key vocabulary."""
    essay: list
    words: "AdjectiveNounWords"


class AdjectiveNounWords:
    """sorted(set(f"{adj}-{noun}")) as a lazy sequence (RULER's key words: 6.2 million strings,
    ~0.8 GB as a list). Each adjective's strings are contiguous and ordered by noun, except where
    one adjective's block interleaves another's ("old-…" and "old-fashioned-…"): such blocks are
    merged into a cluster that is sorted when first read."""

    def __init__(self, adjectives, nouns):
        self.nouns = sorted(set(nouns))
        first, last = self.nouns[0], self.nouns[-1]
        clusters = []                                  # [adjectives, largest string]
        for adj in sorted(set(adjectives), key=lambda a: f"{a}-{first}"):
            if clusters and f"{adj}-{first}" <= clusters[-1][1]:
                clusters[-1][0].append(adj)
                clusters[-1][1] = max(clusters[-1][1], f"{adj}-{last}")
            else:
                clusters.append([[adj], f"{adj}-{last}"])
        self.clusters = [c[0] for c in clusters]
        self._sorted = {}
        sizes = [len(self.nouns) if len(c) == 1 else len(self._cluster(i)) for i, c in enumerate(self.clusters)]
        self.ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]

    def _cluster(self, i):
        if i not in self._sorted:
            self._sorted[i] = sorted({f"{a}-{n}" for a in self.clusters[i] for n in self.nouns})
        return self._sorted[i]

    def __len__(self):
        return self.ends[-1]

    def __getitem__(self, k):
        if not 0 <= k < len(self):
            raise IndexError(k)
        i = bisect.bisect_right(self.ends, k)
        offset = k - (self.ends[i - 1] if i else 0)
        if len(self.clusters[i]) == 1:
            return f"{self.clusters[i][0]}-{self.nouns[offset]}"
        return self._cluster(i)[offset]


def load_assets(folder):
    """The S-NIAH assets of a ruler_niah folder."""
    folder = Path(folder)
    for name in ASSET_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"niah --data {str(folder)!r} lacks {name} (expected a ruler_niah folder)")
    essay = json.loads((folder / ASSET_FILES[0]).read_text(encoding="utf-8"))["text"]
    adjectives, nouns = ((folder / name).read_text(encoding="utf-8").splitlines() for name in ASSET_FILES[1:])
    return Assets(re.sub(r"\s+", " ", essay).split(" "),
                  AdjectiveNounWords([w.rstrip() for w in adjectives], [w.rstrip() for w in nouns]))


def split_sentences(text):
    """Sentences of text: a split after ., ! or ? (and a closing quote or bracket) before whitespace."""
    text = text.strip()
    return re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+", text) if text else []


def _random_value(rng, kind, assets):
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return rng.choice(assets.words)


def _prompt_template():
    """RULER's rewrite of the template for one needle and one query (before formatting)."""
    return TEMPLATE.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def generate_input_output(rng, task, assets, num_haystack):
    """(prompt, [value]) with a haystack of num_haystack units; draws from rng in RULER's order."""
    haystack, key_type, value_type = _TASK_TYPES[task]
    key = _random_value(rng, key_type, assets)
    value = _random_value(rng, value_type, assets)
    needle = NEEDLE.format(type_needle_v=value_type, key=key, value=value)
    # (RULER shuffles the needles with a fresh random.Random(42): a no-op for one needle.)
    if haystack == "essay":
        sentences = split_sentences(" ".join(assets.essay[:num_haystack]))
        at = int(len(sentences) * (rng.sample(DEPTHS, 1)[0] / 100))
        context = " ".join([" ".join(sentences[:at]), needle, " ".join(sentences[at:])])
    else:
        if num_haystack < 1:
            raise ValueError("the noise haystack needs at least one line")
        lines = [NOISE] * num_haystack
        lines.insert(rng.sample(range(num_haystack), 1)[0], needle)
        context = "\n".join(lines)
    rng.sample(range(1), 1)                   # RULER draws which key to query, here always the one
    prompt = _prompt_template().format(type_needle_v=value_type[:-1], context=context, query=key)
    return prompt, [value]


def _step(task):
    """The haystack's growth step: essay words or noise lines (byte-level; see the module docstring)."""
    return ESSAY_STEP if _TASK_TYPES[task][0] == "essay" else NOISE_STEP


def _n_bytes(text):
    return len(text.encode("utf-8"))


def fit_haystack(rng, task, assets, length):
    """RULER's 2024 search: grow the haystack by steps while prompt + answer + 128 fits `length`."""
    step, essay = _step(task), _TASK_TYPES[task][0] == "essay"
    num_haystack, total = step, 0
    while total + TOKENS_TO_GENERATE < length:
        prompt, answer = generate_input_output(rng, task, assets, num_haystack)
        total = _n_bytes(prompt + " ".join(answer))
        if total + TOKENS_TO_GENERATE > length:
            num_haystack -= step
            break
        if essay and num_haystack > len(assets.essay):
            num_haystack = len(assets.essay)
            break
        num_haystack += step
    return num_haystack


def generate_task(task, assets, length, samples):
    """`samples` (prompt, [value]) pairs of `task` whose prompt + 128 bytes fit `length` bytes; the
    generator is random.Random(42), as each of RULER's (task, length) runs starts."""
    if task not in _TASK_TYPES:
        raise ValueError(f"unknown S-NIAH task {task!r}; expected one of {', '.join(TASKS)}")
    rng = random.Random(SEED)
    step = _step(task)
    num_haystack = fit_haystack(rng, task, assets, length)
    too_short = ValueError(f"--lengths {length} is too short for {task}: the template and one haystack "
                           f"step take more than {length} − {TOKENS_TO_GENERATE} bytes")
    if num_haystack < step:
        raise too_short
    out = []
    for _ in range(samples):
        used = num_haystack
        while True:
            prompt, answer = generate_input_output(rng, task, assets, used)
            if _n_bytes(prompt) + TOKENS_TO_GENERATE <= length:
                break
            if used <= step:
                raise too_short
            used -= step
        out.append((prompt, answer))
    return out


def postprocess(prediction):
    """RULER's post-processing of a prediction: strip, control characters → newline, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()
