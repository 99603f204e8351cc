"""Evaluation: bits per byte, LAMBADA, RULER S-NIAH (mirascore.lm.evaluate, mirascore.lm.niah)."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from mirascore.lm import config, evaluate, model, niah

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"      # ../shared/data of the checkout


def tiny(name="moneta", **train_keys):
    table = {"batch": 4, "context": 16, "steps": 2, "warmup": 0}
    table.update(train_keys)
    return config.from_dict({"model": {"model": name, "width": 16, "depth": 1, "heads": 2, "chunk": 8},
                             "train": table})


def nats_of(params, cfg, seq):
    """Σ −log p(seq[t+1] | seq[:t+1]) by one forward pass over seq (float64 on the host)."""
    logits = np.asarray(model.forward(params, np.asarray(seq, np.int32)[None, :-1], cfg), np.float64)[0]
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    return -log_p[np.arange(len(seq) - 1), np.asarray(seq[1:])].sum()


def test_bits_per_byte_is_nats_over_ln2():
    assert evaluate.bits_per_byte(math.log(2)) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["moneta", "transformer"])
def test_text_bpb_predicts_every_byte_but_the_first_once(name):
    cfg = tiny(name)
    params = model.init(cfg, seed=1)
    text = np.random.default_rng(0).integers(0, 256, 5 * 16 + 7).astype(np.uint8)
    got = evaluate.text_bpb(params, cfg, text)
    assert got["bytes"] == len(text) - 1 and got["windows"] == 6
    windows = [text[k * 16:k * 16 + 17] for k in range(5)] + [text[80:]]
    assert sum(len(w) - 1 for w in windows) == len(text) - 1
    expected = sum(nats_of(params, cfg, w) for w in windows) / (len(text) - 1) / math.log(2)
    assert got["bpb"] == pytest.approx(expected, rel=1e-5)
    assert evaluate.text_bpb(params, cfg, text, max_bytes=33)["bytes"] == 32


def test_mean_loss_is_the_mean_over_batches():
    cfg = tiny(accumulate=2)
    params = model.init(cfg)
    batches = [np.random.default_rng(i).integers(0, 256, (4, 17)).astype(np.int32) for i in range(2)]
    expected = np.mean([float(model.loss(params, b[r:r + 2], cfg)) for b in batches for r in (0, 2)])
    assert evaluate.mean_loss(params, cfg, batches) == pytest.approx(expected, rel=1e-6)


def write_lambada(folder, texts):
    path = folder / "lambada_test.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


LAMBADA_TEXTS = ["He opened the door and saw his old friend", "Short one word", "\"Quoted,\" she said, smiling at Anna"]


def test_read_lambada_splits_off_the_last_word(tmp_path):
    pairs = evaluate.read_lambada(write_lambada(tmp_path, LAMBADA_TEXTS))
    assert pairs[0] == ("He opened the door and saw his old", " friend")
    assert evaluate.read_lambada(tmp_path, limit=2) == pairs[:2]            # a folder works too
    with pytest.raises(ValueError, match="last word"):
        evaluate.read_lambada(write_lambada(tmp_path, ["oneword"]))
    with pytest.raises(FileNotFoundError):
        evaluate.read_lambada(tmp_path / "missing.jsonl")


def test_lambada_matches_per_example_forward_passes(tmp_path):
    cfg = tiny("transformer", batch=2)
    params = model.init(cfg, seed=2)
    pairs = evaluate.read_lambada(write_lambada(tmp_path, LAMBADA_TEXTS))
    got = evaluate.lambada(params, cfg, pairs)
    nats = []
    for context, target in pairs:
        c, t = context.encode(), target.encode()
        nats.append(nats_of(params, cfg, list(c + t)) - nats_of(params, cfg, list(c)))   # −log p(t | c)
    assert got["examples"] == 3
    assert got["ppl"] == pytest.approx(math.exp(np.mean(nats)), rel=1e-5)
    n_bytes = sum(len(t.encode()) for _, t in pairs)
    assert got["byte_ppl"] == pytest.approx(math.exp(sum(nats) / n_bytes), rel=1e-5)
    assert got["bpb"] == pytest.approx(sum(nats) / n_bytes / math.log(2), rel=1e-5)


def test_target_scores_are_each_pairs_own_in_the_given_order():
    cfg = tiny("gated_deltanet", batch=2)
    params = model.init(cfg, seed=3)
    pairs = [(b"a longer context here", b" xy"), (b"ab", b" z"), (b"mid context", b" target"), (b"qr", b"!")]
    got = evaluate.target_scores(params, cfg, pairs)            # sorted by length inside: 3 batches
    for (context, target), (nats, _) in zip(pairs, got):
        want = nats_of(params, cfg, list(context + target)) - nats_of(params, cfg, list(context))
        assert nats == pytest.approx(want, rel=1e-5)


def test_lambada_accuracy_counts_targets_whose_every_byte_is_the_argmax(monkeypatch):
    def next_byte_is_plus_one(params, tokens, cfg):           # a fake model: predicts byte + 1
        return np.eye(256)[(np.asarray(tokens) + 1) % 256] * 10.0
    monkeypatch.setattr(evaluate.lm_model, "forward", next_byte_is_plus_one)
    pairs = [("abc\x1f", " !\"#"), ("abc\x1f", " !x"), ("xyz\x1f", " !")]
    got = evaluate.lambada({"w": np.zeros(1)}, tiny(batch=2), pairs)
    assert got["acc"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------ S-NIAH

def write_niah_assets(folder, adjectives=("old", "old-fashioned", "blue", "tiny"), nouns=("cat", "dog", "fox")):
    sentences = [f"Essay sentence {i} talks about startups and {('growth', 'users', 'money')[i % 3]}." for i in range(3000)]
    (folder / "PaulGrahamEssays.json").write_text(json.dumps({"text": "  ".join(sentences)}))
    (folder / "wonderwords_adjectivelist.txt").write_text("\n".join(adjectives) + "\n")
    (folder / "wonderwords_nounlist.txt").write_text("\n".join(nouns) + "\n")
    return folder


@pytest.mark.parametrize("adjectives, nouns", [
    (["old", "old-fashioned", "blue", "tiny", "blue-eyed "], ["cat", "dog", "fashioned-cat", "a"]),
    (["a", "a-b", "a-b-c", "ab"], ["b-c", "b", "c", "a"]),
    (["x"], ["y"]),
])
def test_adjective_noun_words_equal_rulers_sorted_set(adjectives, nouns):
    adjectives = [a.rstrip() for a in adjectives]
    words = niah.AdjectiveNounWords(adjectives, nouns)
    expected = sorted(set(f"{a}-{n}" for a in adjectives for n in nouns))
    assert len(words) == len(expected) and [words[i] for i in range(len(words))] == expected
    with pytest.raises(IndexError):
        words[len(words)]


@pytest.mark.parametrize("task, value_pattern, haystack", [
    ("niah_single_1", r"\d{7}", "The grass is green."),
    ("niah_single_2", r"\d{7}", "Essay sentence"),
    ("niah_single_3", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", "Essay sentence"),
])
def test_generated_prompts_follow_rulers_template_and_fit(tmp_path, task, value_pattern, haystack):
    assets = niah.load_assets(write_niah_assets(tmp_path))
    samples = niah.generate_task(task, assets, 1500, 4)
    assert samples == niah.generate_task(task, assets, 1500, 4)                  # seeded: random.Random(42)
    kind = "uuid" if task == "niah_single_3" else "number"
    for prompt, (value,) in samples:
        assert re.fullmatch(value_pattern, value)
        assert len(prompt.encode()) + niah.TOKENS_TO_GENERATE <= 1500
        assert len(prompt.encode()) + niah.TOKENS_TO_GENERATE > 1500 - 400          # the haystack fills the window
        assert prompt.startswith(f"A special magic {kind} is hidden within the following text. Make sure to "
                                 f"memorize it. I will quiz you about the {kind} afterwards.\n")
        key = re.search(rf"One of the special magic {kind}s for (\S+) is: {re.escape(value)}\.", prompt).group(1)
        assert prompt.endswith(f"\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
                               f"The special magic {kind} for {key} mentioned in the provided text is")
        assert haystack in prompt


def test_too_short_lengths_are_a_value_error(tmp_path):
    assets = niah.load_assets(write_niah_assets(tmp_path))
    with pytest.raises(ValueError, match="too short"):
        niah.generate_task("niah_single_2", assets, 300, 1)


def test_rulers_string_match_all():
    assert evaluate.score_prediction("  1234567.\n more", ["1234567"]) == 1.0
    assert evaluate.score_prediction("The ABC-def", ["abc-DEF"]) == 1.0
    assert evaluate.score_prediction("123456", ["1234567"]) == 0.0
    assert niah.postprocess(" \x01a\x02b\x1f ") == "a\nb"


def test_niah_scores_an_oracle_100_and_a_real_model_in_range(tmp_path, monkeypatch):
    assets = niah.load_assets(write_niah_assets(tmp_path))
    cfg = tiny("gated_deltanet")
    params = model.init(cfg)
    real = evaluate.niah(params, cfg, assets, [700], 1, tasks=("niah_single_1",))["scores"]
    assert set(real) == {"niah_single_1"} and 0.0 <= real["niah_single_1"][700] <= 100.0
    answers = {}
    for task in niah.TASKS:
        for prompt, (value,) in niah.generate_task(task, assets, 1000, 2):
            answers[prompt.encode()] = f" {value}. More text".encode()
    monkeypatch.setattr(evaluate, "generate", lambda params, cfg, prompt, n, temperature: answers[prompt])
    oracle = evaluate.niah(params, cfg, assets, [1000], 2)["scores"]
    assert oracle == {task: {1000: 100.0} for task in niah.TASKS}


def test_niah_answer_bpb_is_the_answers_teacher_forced_cost(tmp_path):
    assets = niah.load_assets(write_niah_assets(tmp_path))
    cfg = tiny("moneta", batch=2)          # 3 samples: batches of 2 and 1, prompts of unequal length
    params = model.init(cfg, seed=1)
    got = evaluate.niah(params, cfg, assets, [1000, 1200], 3, tasks=("niah_single_1", "niah_single_3"))
    for task in ("niah_single_1", "niah_single_3"):
        for length in (1000, 1200):
            nats, n_bytes = 0.0, 0
            for prompt, references in niah.generate_task(task, assets, length, 3):
                p, a = prompt.encode(), (" " + ", ".join(references)).encode()
                nats += nats_of(params, cfg, list(p + a)) - nats_of(params, cfg, list(p))   # −log p(a | p)
                n_bytes += len(a)
            assert got["answer_bpb"][task][length] == pytest.approx(nats / n_bytes / math.log(2), rel=1e-5)


@pytest.mark.skipif(not (SHARED_DATA / "ruler_niah").is_dir(), reason="needs ../shared/data/ruler_niah")
def test_the_real_ruler_assets():
    assets = niah.load_assets(SHARED_DATA / "ruler_niah")
    assert len(assets.essay) == 525_450 and len(assets.words) == 6_175_260
    for task in niah.TASKS:
        for length in (1024, 4096):
            for prompt, _ in niah.generate_task(task, assets, length, 3):
                assert length - 400 < len(prompt.encode()) + niah.TOKENS_TO_GENERATE <= length


@pytest.mark.skipif(not (SHARED_DATA / "lambada_openai").is_dir(), reason="needs ../shared/data/lambada_openai")
def test_the_real_lambada_file():
    pairs = evaluate.read_lambada(SHARED_DATA / "lambada_openai", limit=8)
    cfg = tiny("transformer")
    got = evaluate.lambada(model.init(cfg), cfg, pairs)
    assert got["examples"] == 8 and 0 <= got["acc"] <= 1 and got["byte_ppl"] > 1
