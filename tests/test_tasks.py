"""Tasks: registry, loading (local / hub / malformed), prompts, scoring, SFT texts, arith generator."""

import hashlib
import json
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

import tokentrust.tasks.io as tio
from tokentrust.tasks import Example, Score, Task, available_tasks, get_task
from tokentrust.tasks.arith import IMPLIED_MATERIAL, MEASURES, NAMES, OBJECTS, UNIT_WORDS

DEFAULT_ARITH_DIGEST = "b81b9f6ed91ba3ad"  # the default arith train split before implied_unit existed

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

GSM_ROWS = [
    {"question": "Tom has 3 apples and buys 1,231 more. How many?",
     "answer": "Tom has 3 + 1231 = <<3+1231=1234>>1234 apples.\n#### 1,234"},
    {"question": "A pen costs $2. How much do 5 pens cost?", "answer": "5 * 2 = $<<5*2=10>>10.\n#### 10"},
]


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def gsm_dir(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM_ROWS)
    write_jsonl(tmp_path / "test.jsonl", GSM_ROWS[:1])
    return tmp_path


# ----------------------------------------------------------------------------- registry

def test_registry():
    assert {"gsm8k", "math500", "arith"} <= set(available_tasks())
    assert isinstance(get_task("arith"), Task) and get_task("arith").name == "arith"
    with pytest.raises(ValueError, match="unknown task 'nope'.*arith"):
        get_task("nope")


# ----------------------------------------------------------------------------- gsm8k

def test_gsm8k_local_examples_prompt_and_sft(gsm_dir):
    task = get_task("gsm8k", data_dir=gsm_dir)
    ex = task.examples("train")
    assert [e.answer for e in ex] == ["1234", "10"]  # gold after ####, commas stripped
    assert ex[0].id == "gsm8k-train-00000" and ex[0].question == GSM_ROWS[0]["question"]
    assert len(task.examples("test")) == 1
    p = task.prompt(ex[0])
    assert p.startswith(GSM_ROWS[0]["question"]) and '"The answer is N."' in p
    assert task.chat(ex[0]) == [{"role": "user", "content": p}]
    assert task.sft_text(ex[0]) == "Tom has 3 + 1231 = 1234 apples.\n#### 1234"
    assert task.sft_text(ex[1]) == "5 * 2 = $10.\n#### 10"
    assert list(task.corpus_texts("train")) == [e.question + "\n" + task.sft_text(e) for e in ex]
    with pytest.raises(ValueError, match="no split 'validation'"):
        task.examples("validation")


@pytest.mark.parametrize("completion, correct, format_ok", [
    ("1231 + 3 = 1234\n#### 1234", True, True),
    ("#### 1,234", True, True),
    ("so \\boxed{1234}", True, True),
    ("#### 1234.0 apples.", True, True),
    ("#### 1235", False, True),
    ("#### 1234\nactually\n#### 1235", False, True),
    ("the answer is 1234", True, True),  # the phrase the prompt asks for
    ("so it is 1234", False, False),
    ("", False, False),
])
def test_gsm8k_score(gsm_dir, completion, correct, format_ok):
    task = get_task("gsm8k", data_dir=gsm_dir, format_reward=0.1)
    s = task.score(completion, task.examples("train")[0])
    assert isinstance(s, Score)
    assert (s.correct, s.format_ok) == (correct, format_ok)
    assert s.reward == pytest.approx((1.0 if correct else 0.0) + (0.1 if format_ok else 0.0))


def test_gsm8k_answer_fallback(gsm_dir):
    ex = get_task("gsm8k", data_dir=gsm_dir).examples("train")[0]
    strict = get_task("gsm8k", data_dir=gsm_dir)
    loose = get_task("gsm8k", data_dir=gsm_dir, answer_fallback=True, format_reward=0.5)
    assert strict.score("we get 1234 in the end", ex) == Score(0.0, False, False, None)
    assert loose.score("we get 1234 in the end", ex) == Score(1.0, True, False, "1234")
    assert strict.score(None, ex) == Score(0.0, False, False, None)  # type: ignore[arg-type]


def test_gsm8k_malformed_lines(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl",
                       [GSM_ROWS[0], "{not json", "", "[1, 2]", {"question": "q", "answer": "no marker"}, GSM_ROWS[1]])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2:") + ".*malformed"):
        get_task("gsm8k", data_dir=tmp_path).examples("train")
    task = get_task("gsm8k", data_dir=tmp_path, on_bad_line="skip")
    assert [e.answer for e in task.examples("train")] == ["1234", "10"]
    assert task.skipped_lines == 3  # bad JSON, a list, a gold without '####' (the blank line is ignored)


def test_gsm8k_bad_gold_names_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GSM_ROWS[0], {"question": "q", "answer": "x\n#### many"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2:") + ".*'answer'"):
        get_task("gsm8k", data_dir=tmp_path).examples("train")


def test_gsm8k_missing_field_and_empty(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GSM_ROWS[0], {"question": "no answer field"}])
    for mode in ("raise", "skip"):  # a missing field raises even in skip mode
        with pytest.raises(ValueError, match=re.escape(f"{path}:2: missing field 'answer'")):
            get_task("gsm8k", data_dir=tmp_path, on_bad_line=mode).examples("train")
    empty = write_jsonl(tmp_path / "e" / "train.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*empty dataset"):
        get_task("gsm8k", data_dir=empty.parent).examples("train")
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        get_task("gsm8k", data_dir=tmp_path / "e").examples("test")
    with pytest.raises(ValueError, match="on_bad_line"):
        get_task("gsm8k", data_dir=tmp_path, on_bad_line="ignore").examples("train")


def test_gsm8k_hub_path(monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(*args, split):
        calls.append((args, split))
        return [dict(GSM_ROWS[1])]

    fake.load_dataset = load_dataset
    monkeypatch.setattr(tio, "find_data_dir", lambda name: None)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    task = get_task("gsm8k")
    assert [e.answer for e in task.examples("test")] == ["10"]
    assert calls == [(("openai/gsm8k", "main"), "test")] and task.sources["test"] == "openai/gsm8k[test]"

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match="datasets.*data_dir|data_dir.*datasets"):
        get_task("gsm8k").examples("train")


def test_default_data_dir_found_from_another_cwd(tmp_path, monkeypatch):
    if not (DATA / "gsm8k" / "test.jsonl").is_file():
        pytest.skip("shared data not present")
    monkeypatch.chdir(tmp_path)  # no ../shared here: found relative to the repo root
    task = get_task("gsm8k")
    assert len(task.examples("test")) == 1319
    assert Path(task.sources["test"]) == (DATA / "gsm8k" / "test.jsonl").resolve()


def test_real_gsm8k_sft_texts_score_correct():
    if not (DATA / "gsm8k" / "train.jsonl").is_file():
        pytest.skip("shared data not present")
    task = get_task("gsm8k", data_dir=DATA / "gsm8k")
    for split, n in (("train", 7473), ("test", 1319)):
        ex = task.examples(split)
        assert len(ex) == n
        for e in ex:
            sft = task.sft_text(e)
            assert "<<" not in sft and sft.endswith(f"#### {e.answer}") and "," not in e.answer
            assert task.score(sft, e).correct
            assert not task.score(f"#### {int(e.answer) + 1}", e).correct


# ----------------------------------------------------------------------------- math500

def test_math500_splits_and_scoring(tmp_path):
    rows = [{"problem": "What is $7/3 \\cdot 2$?", "solution": "It is $\\boxed{\\frac{14}{3}}$.",
             "answer": "\\frac{14}{3}", "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}]
    write_jsonl(tmp_path / "test.jsonl", rows)
    task = get_task("math500", data_dir=tmp_path, format_reward=0.25)
    with pytest.raises(ValueError, match="no split 'train'"):
        task.examples("train")
    (ex,) = task.examples("test")
    assert ex.id == "test/algebra/1.json" and ex.meta == {"subject": "Algebra", "level": 1}
    assert "\\boxed{}" in task.prompt(ex) and task.prompt(ex).endswith(rows[0]["problem"])
    assert task.sft_text(ex) == rows[0]["solution"]
    assert task.score("so $\\boxed{\\dfrac{14}{3}}$", ex) == Score(1.25, True, True, "\\dfrac{14}{3}")
    assert task.score("\\boxed{\\frac{3}{14}}", ex) == Score(0.25, False, True, "\\frac{3}{14}")
    assert task.score("\\boxed{}", ex) == Score(0.0, False, False, None)
    assert task.score("it is 14/3", ex) == Score(0.0, False, False, None)
    loose = get_task("math500", data_dir=tmp_path, answer_fallback=True)
    assert loose.score("it is 14/3", ex) == Score(1.0, True, False, "14/3")
    # a solution without a boxed answer gets one appended
    bare = Example("x", "q", "7", solution="Seven.")
    assert task.sft_text(bare) == "Seven.\n\nThe final answer is $\\boxed{7}$."


def test_real_math500():
    if not (DATA / "math500" / "test.jsonl").is_file():
        pytest.skip("shared data not present")
    task = get_task("math500", data_dir=DATA / "math500")
    ex = task.examples("test")
    assert len(ex) == 500 and len({e.id for e in ex}) == 500
    assert all(task.score(task.sft_text(e), e).correct for e in ex)  # the fast path: identical strings
    assert sum(e.meta["level"] == 5 for e in ex) > 0


# ----------------------------------------------------------------------------- arith

def _interpret(question: str) -> int:
    """Independent reference: recompute the answer by reading the question's sentences."""
    value = None
    for sent in re.split(r"(?<=[.?])\s+", question):
        if m := re.match(r"\w+ has (\d+) ", sent):
            value = int(m.group(1))
        elif m := re.search(r"(finds|buys|gets|receives|collects|wins) (\d+) more", sent):
            value += int(m.group(2))
        elif m := re.search(r"(gives away|loses|sells|uses|drops) (\d+) ", sent):
            value -= int(m.group(2))
        elif "twice as many" in sent:
            value *= 2
        elif "three times as many" in sent:
            value *= 3
    return value


def test_arith_answers_match_an_independent_interpreter():
    task = get_task("arith", steps=3, num_train=400, num_test=100)
    for split in ("train", "test"):
        for e in task.examples(split):
            n, unit = e.answer.split(" ", 1)
            assert int(n) == _interpret(e.question) == e.meta["number"] >= 0
            assert unit == (e.meta["unit_singular"] if int(n) == 1 else e.meta["unit"])
            assert f"How many {e.meta['unit']}" in e.question
            assert 1 <= len(e.meta["ops"]) <= 3
            assert task.score(task.sft_text(e), e).correct


def test_arith_deterministic_and_disjoint():
    a = get_task("arith", seed=3, num_train=300, num_test=200)
    b = get_task("arith", seed=3, num_train=50, num_test=20)
    c = get_task("arith", seed=4, num_train=300, num_test=200)
    assert a.examples("train")[:50] == b.examples("train")  # per (seed, split, index), not per size
    assert a.examples("test")[7] == a.generate("test", 7)
    assert [e.question for e in a.examples("train")] != [e.question for e in c.examples("train")]
    train = {e.question for e in a.examples("train")}
    test = {e.question for e in a.examples("test")}
    val = {e.question for e in a.examples("validation")}
    assert not (train & test) and not (train & val) and not (test & val)
    assert len(a.examples("validation")) == 200


def test_arith_knobs():
    one = get_task("arith", steps=1, max_operand=5, num_train=200)
    for e in one.examples("train"):
        assert len(e.meta["ops"]) == 1
        assert all(k <= 5 for kind, k in e.meta["ops"] if kind != "mul")
        assert int(re.match(r"\w+ has (\d+)", e.question).group(1)) <= 5
    three = get_task("arith", steps=3, min_steps=3, num_train=50)
    assert all(len(e.meta["ops"]) == 3 for e in three.examples("train"))
    with pytest.raises(ValueError):
        get_task("arith", steps=0)


def test_arith_vocabulary_is_long_tailed():
    assert 300 <= len(set(NAMES)) + len({s for s, _ in OBJECTS}) + len(MEASURES) <= 500
    assert {"astrolabes", "furlongs", "quills"} <= set(UNIT_WORDS)
    materials = {w for _, _, ms in MEASURES for m in ms for w in m.split()}
    assert not (materials & set(UNIT_WORDS)) and not ({n.lower() for n in NAMES} & set(UNIT_WORDS))
    counts = Counter(e.meta["unit"] for e in get_task("arith").examples("train"))  # 5000 problems
    top = counts.most_common(1)[0][1]
    assert top > 20 * sorted(counts.values())[len(counts) // 2]  # head >> median
    assert sum(c <= 3 for c in counts.values()) >= 10  # a real tail of rare units


@pytest.mark.parametrize("completion, correct, format_ok", [
    ("Zebulon starts with 5 quills. 5 + 12 = 17. #### 17 quills", True, True),
    ("#### 17 Quills", True, True),            # case-insensitive
    ("#### 17 quill", True, True),             # singular accepted
    ("#### 17 quills of ink.", True, True),
    ("#### 17", False, True),                  # the unit is required
    ("#### 17 astrolabes", False, True),       # the right unit
    ("#### 17 quills astrolabes furlongs", False, True),  # listing units earns nothing
    ("#### 18 quills", False, True),
    ("#### quills 17", True, True),
    ("17 quills", False, False),               # no '####'
    ("#### 17 quills\n#### 16 quills", False, True),  # the last '####' line counts
])
def test_arith_score(completion, correct, format_ok):
    task = get_task("arith", format_reward=0.1)
    ex = Example("t", "Zebulon has 5 quills. Zebulon finds 12 more quills. How many quills does Zebulon have now?",
                 "17 quills", solution=None)
    s = task.score(completion, ex)
    assert (s.correct, s.format_ok) == (correct, format_ok)
    assert s.reward == pytest.approx(float(correct) + 0.1 * format_ok)


def test_arith_implied_unit_is_recalled_not_copied():
    task = get_task("arith", implied_unit=True, measure_frac=1.0, steps=3, num_train=2000, num_test=600)
    mixed = get_task("arith", implied_unit=True, measure_frac=0.5, num_train=400)
    assert len(set(IMPLIED_MATERIAL)) == len(MEASURES) == len(set(IMPLIED_MATERIAL.values()))
    assert not set(IMPLIED_MATERIAL.values()) & set(UNIT_WORDS)
    for e in task.examples("train") + task.examples("test"):
        n, unit = e.answer.split(" ", 1)
        assert int(n) == _interpret(e.question) == e.meta["number"]
        assert e.meta["implied_unit"] and e.meta["material"] == IMPLIED_MATERIAL[e.meta["unit_singular"]]
        words = set(re.findall(r"[a-z]+", e.question.lower()))
        assert not words & set(UNIT_WORDS)  # no answer word to copy
        assert f"How much {e.meta['material']} does" in e.question and "measure" in e.question
        assert task.score(task.sft_text(e), e).correct
        assert not task.score(f"#### {n} measures of {e.meta['material']}", e).correct
    rare = [e for e in task.examples("test") if task.answer_class(e.answer) == "rare"]
    assert 0.1 < len(rare) / 600 < 0.3  # the tail of the unit list
    # objects stay as they were; measures become implied
    assert {e.meta.get("implied_unit", False) for e in mixed.examples("train")} == {True, False}
    assert all(f"How many {e.meta['unit']}" in e.question for e in mixed.examples("train") if "material" not in e.meta)
    with pytest.raises(ValueError):
        get_task("arith", measure_frac=1.5)


def test_arith_default_problems_unchanged():
    """The implied-unit option leaves the default generator as it was (warm-start caches stay valid)."""
    e = get_task("arith").generate("train", 0)
    digest = hashlib.sha256("|".join(f"{x.question}#{x.solution}" for x in get_task("arith", num_train=200)
                                     .examples("train")).encode()).hexdigest()[:16]
    assert e == get_task("arith", implied_unit=False).generate("train", 0)
    assert digest == DEFAULT_ARITH_DIGEST


def test_arith_fallback_and_singular_gold():
    ex = Example("t", "q", "1 goose")
    assert get_task("arith").score("#### 1 geese", ex).correct
    assert not get_task("arith").score("so 1 goose", ex).correct
    assert get_task("arith", answer_fallback=True).score("so\n1 goose", ex) == Score(1.0, True, False, "1 goose")


def test_arith_corpus_texts():
    task = get_task("arith", num_train=10)
    texts = list(task.corpus_texts("train"))
    assert len(texts) == 10 and all("####" in t and "How many" in t for t in texts)
