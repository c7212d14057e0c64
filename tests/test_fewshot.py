from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ltm_pyro.data import read_splits
from ltm_pyro.errors import UsageError
from ltm_pyro.fewshot import (
    SEPARATOR,
    PermutationTask,
    QAExample,
    apply,
    blind_guess_accuracy,
    draw_exemplars,
    exact_match,
    example_text,
    few_shot_items,
    final_number,
    normalise_number,
    overlapping_questions,
    qa_prompt,
    read_qa_jsonl,
    score_predictions,
)
from ltm_pyro.tokenizers import WordTokenizer


def parse_item(text: str) -> tuple[int, ...]:
    return tuple(int(word[1:]) for word in text.split())


def parse_examples(line: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    pairs = []
    for example in line.split(" ; "):
        source, target = example.split(" > ")
        pairs.append((parse_item(source), parse_item(target)))
    return pairs


# --- hidden-permutation task -----------------------------------------------------------------


def test_split_is_disjoint_complete_and_deterministic():
    task = PermutationTask(alphabet=5, length=3, eval_fraction=0.2, seed=3)
    train, evals = set(task.train_items), set(task.eval_items)
    assert not train & evals
    assert len(train) + len(evals) == 5 ** 3 == len(train | evals)
    assert len(evals) == round(0.2 * 125)
    again = PermutationTask(alphabet=5, length=3, eval_fraction=0.2, seed=3)
    assert again.eval_items == task.eval_items
    assert PermutationTask(alphabet=5, length=3, eval_fraction=0.2, seed=4).eval_items \
        != task.eval_items


def test_rules_are_all_sorted_permutations():
    task = PermutationTask(length=3)
    assert task.rules == [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]


def test_apply_and_example_text():
    assert apply((2, 0, 1), (7, 8, 9)) == (9, 7, 8)
    assert example_text((3, 1, 4, 0), (2, 0, 3, 1)) == "s3 s1 s4 s0 > s4 s3 s0 s1"


@pytest.mark.parametrize("fields", [
    dict(alphabet=1), dict(length=1), dict(eval_fraction=0.0), dict(eval_fraction=1.0),
    dict(alphabet=50, length=5), dict(alphabet=2, length=2, eval_fraction=0.01),
])
def test_bad_task_fields_raise_usage_error(fields):
    with pytest.raises(UsageError):
        PermutationTask(**fields)


@pytest.mark.parametrize("shots", [0, 1, 2, 4, 8])
def test_few_shot_items_never_leak_evaluation_items(shots):
    task = PermutationTask(alphabet=4, length=3, seed=1)
    train, evals = set(task.train_items), set(task.eval_items)
    items = few_shot_items(task, shots=shots, n_items=300, seed=shots)
    for item in items:
        assert len(item.exemplars) == shots == len(set(item.exemplars))
        assert set(item.exemplars) <= train
        assert not set(item.exemplars) & evals
        assert item.query in evals and item.query not in item.exemplars
        assert item.answer == " ".join(f"s{s}" for s in apply(item.rule, item.query))
        shown = [parse_examples(part)[0] for part in item.prompt.split(" ; ")[:-1]]
        assert [source for source, _ in shown] == item.exemplars
        assert all(target == apply(item.rule, source) for source, target in shown)
        assert item.prompt.endswith(f"{example_text(item.query, item.rule).split(' > ')[0]} >")


def test_zero_shot_prompt_is_just_the_query():
    item = few_shot_items(PermutationTask(), shots=0, n_items=1, seed=0)[0]
    assert re.fullmatch(r"(s\d ){4}>", item.prompt)


def test_few_shot_items_reject_too_many_shots():
    task = PermutationTask(alphabet=2, length=2, eval_fraction=0.5)
    with pytest.raises(UsageError, match="shots"):
        few_shot_items(task, shots=3, n_items=1, seed=0)


def test_training_text_uses_only_train_items_and_one_rule_per_line():
    task = PermutationTask(alphabet=4, length=3, seed=2)
    text = task.training_text(n_episodes=200, examples_per_episode=5, seed=7)
    lines = text.splitlines()
    assert len(lines) == 200 and text.endswith("\n")
    train = set(task.train_items)
    for line in lines:
        pairs = parse_examples(line)
        assert len(pairs) == 5 and {source for source, _ in pairs} <= train
        consistent = [r for r in task.rules if all(apply(r, s) == t for s, t in pairs)]
        assert consistent
    assert text == task.training_text(n_episodes=200, examples_per_episode=5, seed=7)


def test_write_corpus_loads_with_the_text_corpus_reader(tmp_path):
    task = PermutationTask(alphabet=4, length=3)
    paths = task.write_corpus(tmp_path / "perm", train_episodes=30, eval_episodes=5,
                              examples_per_episode=4, seed=1)
    assert sorted(p.name for p in paths.values()) == ["test.txt", "train.txt", "valid.txt"]
    texts = read_splits(tmp_path / "perm")
    assert len(texts["train"].splitlines()) == 30 and len(texts["test"].splitlines()) == 5
    assert texts["valid"] != texts["test"]
    train = set(task.train_items)
    for text in texts.values():
        for line in text.splitlines():
            assert {source for source, _ in parse_examples(line)} <= train
    tokenizer = WordTokenizer.fit(texts["train"])
    assert {f"s{s}" for s in range(4)} | {">", ";"} <= set(tokenizer.vocab)


def test_exact_match_is_exact():
    assert exact_match("s1 s2 s3 s4", "s1 s2 s3 s4")
    assert exact_match(" s1  s2 s3 s4 ; s0 s1 s2 s3 > s1", "s1 s2 s3 s4")
    assert exact_match("s1 s2 s3 s4\ns0", "s1 s2 s3 s4")
    assert exact_match("s1 s2 s3 s4;", "s1 s2 s3 s4")
    assert not exact_match("s1 s2 s3", "s1 s2 s3 s4")
    assert not exact_match("s1 s2 s3 s4 s5", "s1 s2 s3 s4")
    assert not exact_match("", "s1 s2 s3 s4")
    assert not exact_match("; s1 s2 s3 s4", "s1 s2 s3 s4")


# --- GSM8K-style harness ---------------------------------------------------------------------

RECORDS = [
    {"question": "Janet has 16 eggs and eats 3. How many left?", "answer": "16-3=13\n#### 13"},
    {"question": "A shirt costs $1,200. Two shirts?", "answer": "2*1200=2400\n#### 2,400"},
    {"question": "Temperature drops by 3 degrees from 0?", "answer": "0-3=-3\n#### -3"},
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_qa_jsonl_round_trip(tmp_path):
    lines = [json.dumps(r) for r in RECORDS]
    path = write_jsonl(tmp_path / "train.jsonl", [lines[0], "", lines[1], "  ", lines[2]])
    examples = read_qa_jsonl(path)
    assert [e.question for e in examples] == [r["question"] for r in RECORDS]
    assert [e.answer for e in examples] == [r["answer"] for r in RECORDS]
    assert [e.final for e in examples] == ["13", "2400", "-3"]


def test_read_qa_jsonl_bad_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), "", "{not json"])
    with pytest.raises(UsageError, match=r"bad\.jsonl, line 3"):
        read_qa_jsonl(path)


def test_read_qa_jsonl_missing_final_number_names_the_line(tmp_path):
    record = {"question": "q", "answer": "no marker here 12"}
    path = write_jsonl(tmp_path / "x.jsonl", [json.dumps(RECORDS[0]), json.dumps(record)])
    with pytest.raises(UsageError, match=r"line 2.*####"):
        read_qa_jsonl(path)


def test_read_qa_jsonl_missing_key_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [json.dumps({"question": "q"})])
    with pytest.raises(UsageError, match="line 1"):
        read_qa_jsonl(path)
    with pytest.raises(UsageError, match="no such file"):
        read_qa_jsonl(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("text, expected", [
    ("18", "18"), ("18.0", "18"), ("18.50", "18.5"), ("-3", "-3"), ("1,000", "1000"),
    ("$5.", "5"), (" 007 ", "7"), ("-0", "0"), ("+4", "4"), ("eggs", None), ("", None),
    ("1.2.3", None),
])
def test_normalise_number(text, expected):
    assert normalise_number(text) == expected


@pytest.mark.parametrize("generated, expected", [
    (" She has 16 - 3 = 13 eggs. So 13.", "13"),
    (" It costs $1,200 each, so $2,400 in total.", "2400"),
    (" 5 + 5 = 10\n#### 10 and then 99", "10"),
    (" The answer is 7.\n\nQuestion: what is 8 + 9?\nAnswer: 17", "7"),
    (" 5-3=2", "2"),
    (" it falls to -3", "-3"),
    (" no idea", None),
    ("Question: 4 + 4?", None),
])
def test_final_number(generated, expected):
    assert final_number(generated) == expected


def test_qa_prompt_format():
    exemplars = [QAExample("What is 1+1?", "1+1=2\n#### 2", "2")]
    assert qa_prompt(exemplars, "What is 2+2?") == (
        "Question: What is 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: What is 2+2?\nAnswer:")
    assert qa_prompt([], "Q?") == "Question: Q?\nAnswer:"


def test_score_predictions_counts_exact_matches_only():
    examples = [QAExample("a", "#### 18", "18"), QAExample("b", "#### 7", "7"),
                QAExample("c", "#### 1000", "1000")]
    scores = score_predictions(examples, [" so 18.5", " #### 7", " 1,000 total"])
    assert scores == {"correct": 2, "total": 3, "accuracy": pytest.approx(2 / 3)}
    assert score_predictions([], [])["total"] == 0
    with pytest.raises(UsageError):
        score_predictions(examples, ["18"])


def test_draw_exemplars_only_from_train_and_reproducible():
    train = [QAExample(f"train {i}", f"#### {i}", str(i)) for i in range(20)]
    test = [QAExample(f"test {i}", f"#### {i}", str(i)) for i in range(5)]
    assert overlapping_questions(train, test) == []
    for seed in range(30):
        drawn = draw_exemplars(train, shots=8, seed=seed)
        assert len({e.question for e in drawn}) == 8
        assert all(e in train for e in drawn) and not any(e in test for e in drawn)
    assert draw_exemplars(train, 8, seed=3) == draw_exemplars(train, 8, seed=3)
    assert draw_exemplars(train, 8, seed=3) != draw_exemplars(train, 8, seed=4)
    with pytest.raises(UsageError, match="shots"):
        draw_exemplars(train, shots=21, seed=0)


def test_overlapping_questions_flags_leaks():
    train = [QAExample("same q", "#### 1", "1")]
    assert overlapping_questions(train, [QAExample(" same q ", "#### 1", "1")]) == [" same q "]


def test_blind_guess_accuracy_counts_strings_that_hide_the_rule():
    assert blind_guess_accuracy(PermutationTask(alphabet=6, length=3, seed=0)) == pytest.approx(
        0.247, abs=0.02)  # 5/9 distinct (1/6) + 5/12 one repeat (1/3) + 1/36 all same (1)
    big = PermutationTask(alphabet=40, length=2, eval_fraction=0.5, seed=0)
    assert blind_guess_accuracy(big) == pytest.approx(0.5 + 0.5 / 40, abs=0.02)


def test_the_task_refuses_empty_splits_and_accepts_the_smallest_ones():
    """Catches: an eval fraction of 0 or 1 let through, a split of one item refused, and a
    fraction that leaves no training item accepted (4 items: 0.9 rounds to all 4)."""
    for fraction in (0.0, 1.0):
        with pytest.raises(UsageError, match="outside"):
            PermutationTask(eval_fraction=fraction)
    smallest = PermutationTask(alphabet=2, length=2, eval_fraction=0.25)
    assert (len(smallest.train_items), len(smallest.eval_items)) == (3, 1)
    with pytest.raises(UsageError, match="leaves an empty split"):
        PermutationTask(alphabet=2, length=2, eval_fraction=0.9)


def test_counts_are_checked_at_both_ends_and_the_message_names_the_range():
    task = PermutationTask(alphabet=2, length=2, eval_fraction=0.25)  # 3 training items
    assert task.training_text(0, 1, seed=0) == ""
    assert task.training_text(1, 3, seed=0).count(SEPARATOR) == 2  # every training item once
    with pytest.raises(UsageError, match=r"examples_per_episode=4 is out of range; use a "
                                         r"value >= 1 and <= 3"):
        task.training_text(1, 4, seed=0)
    assert few_shot_items(task, 3, 0, seed=0) == []
    with pytest.raises(UsageError, match=r"n_items=-1 is out of range; use a value >= 0$"):
        few_shot_items(task, 1, -1, seed=0)


def test_few_shot_items_and_corpora_repeat_under_their_seed(tmp_path):
    """Catches: an unseeded generator, a corpus folder whose parents are not made or that
    cannot be written twice, and splits drawn from one seed."""
    task = PermutationTask(alphabet=3, length=3)
    assert few_shot_items(task, 2, 5, seed=4) == few_shot_items(task, 2, 5, seed=4)
    nested = tmp_path / "a" / "b"
    first = {k: p.read_text() for k, p in task.write_corpus(nested, 4, 4, 2, seed=1).items()}
    again = {k: p.read_text() for k, p in task.write_corpus(nested, 4, 4, 2, seed=1).items()}
    assert first == again and len(set(first.values())) == 3
    assert len(task.write_corpus(tmp_path / "default", 2, 2, 2)) == 3  # the default seed 0


def test_numbers_are_normalised_and_the_final_one_is_the_last_marked():
    assert normalise_number("12.") == "12" and normalise_number("1.50") == "1.5"
    assert normalise_number(".5") == "0.5"
    assert final_number("So #### 3 then #### 4\nQuestion: x #### 9") == "4"
    assert final_number("It is 7.\nQuestion: #### 8\nQuestion: 9") == "7"


def test_a_worked_answer_scores_its_last_marked_number(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a #### 1 b #### 2"}) + "\n")
    assert read_qa_jsonl(path)[0].final == "2"


def test_the_prompt_shows_each_exemplar_then_the_question():
    from ltm_pyro.fewshot import QAExample

    shown = [QAExample("1+1?", "2 #### 2", "2"), QAExample("2+2?", "4 #### 4", "4")]
    assert qa_prompt(shown, "3+3?") == ("Question: 1+1?\nAnswer: 2 #### 2\n\n"
                                        "Question: 2+2?\nAnswer: 4 #### 4\n\n"
                                        "Question: 3+3?\nAnswer:")
    assert draw_exemplars(shown, 0, seed=0) == []


def test_no_examples_score_zero():
    assert score_predictions([], []) == {"correct": 0, "total": 0, "accuracy": 0.0}
