"""In-context-learning evaluation: a generated few-shot task family and a GSM8K-style harness.

Part A ("hidden permutation") gives a task where few-shot ability can be measured without any
download: each episode hides a permutation of string positions, and the model must infer it
from examples. Evaluation queries are items never seen in training, so a correct answer needs
the rule inferred in context, not a memorised string.

Part B scores few-shot arithmetic word problems from local JSONL files in the GSM8K format.
Exemplars are drawn only from the train list the caller passes in, never from the test file.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .errors import UsageError
from .files import write_text

MAX_ITEMS = 200_000
ARROW = ">"
SEPARATOR = " ; "

Item = tuple[int, ...]
Rule = tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Part A: hidden-permutation task family
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PermutationTask:
    """Strings of ``length`` symbols from ``alphabet``; each episode permutes their positions.

    The item split is fixed by ``seed`` so training text and evaluation prompts agree on which
    inputs are held out.
    """

    alphabet: int = 8
    length: int = 4
    eval_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.alphabet < 2:
            raise UsageError(f"alphabet={self.alphabet} is too small; use an alphabet of >= 2")
        if self.length < 2:
            raise UsageError(f"length={self.length} is too short; use a length of >= 2")
        if not 0 < self.eval_fraction < 1:
            raise UsageError(
                f"eval_fraction={self.eval_fraction} is outside (0, 1); use e.g. 0.25")
        n_items = self.alphabet ** self.length
        if n_items > MAX_ITEMS:
            raise UsageError(
                f"alphabet**length = {n_items} items is too many to enumerate "
                f"(max {MAX_ITEMS}); use a smaller alphabet or length")
        n_eval = round(self.eval_fraction * n_items)
        if not 0 < n_eval < n_items:
            raise UsageError(
                f"eval_fraction={self.eval_fraction} leaves an empty split of {n_items} items; "
                "use a fraction nearer 0.5 or a larger alphabet")

    @cached_property
    def rules(self) -> list[Rule]:
        """All permutations of the positions, sorted so rule indices are stable."""
        return sorted(itertools.permutations(range(self.length)))

    @cached_property
    def _split(self) -> tuple[list[Item], list[Item]]:
        items = list(itertools.product(range(self.alphabet), repeat=self.length))
        random.Random(self.seed).shuffle(items)
        n_eval = round(self.eval_fraction * len(items))
        return items[n_eval:], items[:n_eval]

    @property
    def train_items(self) -> list[Item]:
        """Inputs allowed in training text and as few-shot exemplars."""
        return self._split[0]

    @property
    def eval_items(self) -> list[Item]:
        """Held-out inputs, used only as few-shot queries."""
        return self._split[1]

    def training_text(self, n_episodes: int, examples_per_episode: int, seed: int) -> str:
        """``n_episodes`` lines, each one rule shown on distinct training items."""
        _check_count("n_episodes", n_episodes, minimum=0)
        _check_count("examples_per_episode", examples_per_episode, minimum=1,
                     maximum=len(self.train_items))
        rng = random.Random(seed)
        lines = []
        for _ in range(n_episodes):
            rule = rng.choice(self.rules)
            items = rng.sample(self.train_items, examples_per_episode)
            lines.append(SEPARATOR.join(example_text(item, rule) for item in items) + "\n")
        return "".join(lines)

    def write_corpus(
        self,
        folder: Path,
        train_episodes: int,
        eval_episodes: int,
        examples_per_episode: int,
        seed: int = 0,
    ) -> dict[str, Path]:
        """Write train/valid/test.txt for the text-corpus loader; all splits use training items.

        Valid/test measure language-model fit on the same distribution; few-shot
        generalisation to held-out items is measured separately with :func:`few_shot_items`.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for offset, (split, n_episodes) in enumerate(
            (("train", train_episodes), ("valid", eval_episodes), ("test", eval_episodes))
        ):
            text = self.training_text(n_episodes, examples_per_episode, seed=3 * seed + offset)
            paths[split] = folder / f"{split}.txt"
            write_text(paths[split], text)
        return paths


def symbols(item: Item) -> str:
    """Symbols as words, so a whitespace tokenizer gives one token per symbol."""
    return " ".join(f"s{s}" for s in item)


def apply(rule: Rule, item: Item) -> Item:
    """Position ``i`` of the output is position ``rule[i]`` of the input."""
    return tuple(item[r] for r in rule)


def example_text(item: Item, rule: Rule) -> str:
    """One example, e.g. ``s3 s1 s4 s0 > s4 s3 s0 s1``."""
    return f"{symbols(item)} {ARROW} {symbols(apply(rule, item))}"


@dataclass
class FewShotItem:
    """One prompt, its expected continuation, and what went into it (for leakage checks)."""

    prompt: str
    answer: str
    rule: Rule
    query: Item
    exemplars: list[Item]


def few_shot_items(
    task: PermutationTask, shots: int, n_items: int, seed: int
) -> list[FewShotItem]:
    """Prompts of ``shots`` training examples then a held-out query under a random rule."""
    _check_count("shots", shots, minimum=0, maximum=len(task.train_items))
    _check_count("n_items", n_items, minimum=0)
    rng = random.Random(seed)
    items = []
    for _ in range(n_items):
        rule = rng.choice(task.rules)
        exemplars = rng.sample(task.train_items, shots)
        query = rng.choice(task.eval_items)
        shown = "".join(example_text(e, rule) + SEPARATOR for e in exemplars)
        items.append(FewShotItem(
            prompt=f"{shown}{symbols(query)} {ARROW}",
            answer=symbols(apply(rule, query)),
            rule=rule, query=query, exemplars=exemplars,
        ))
    return items


def exact_match(prediction: str, answer: str) -> bool:
    """Token-exact match of the prediction up to its first ``;`` or newline.

    The model may go on to write another example; only the first output counts.
    """
    cut = re.split(r"[;\n]", prediction, maxsplit=1)[0]
    return cut.split() == answer.split()


def _check_count(name: str, value: int, minimum: int, maximum: int | None = None) -> None:
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise UsageError(f"{name}={value} is out of range; use a value >= {minimum}{upper}")


# --------------------------------------------------------------------------------------------
# Part B: GSM8K-style few-shot arithmetic
# --------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?:(?<![\w-])-)?\$?\d(?:[\d,]*\d)?(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"([+-]?)(\d*)(?:\.(\d*))?")


@dataclass
class QAExample:
    """A word problem, its worked answer, and the normalised final number for scoring."""

    question: str
    answer: str
    final: str


def normalise_number(text: str) -> str | None:
    """Canonical string of a number ("1,000.0" -> "1000", "$5." -> "5"), or None.

    Scoring compares these strings, so equal values must print identically.
    """
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    match = _PLAIN_NUMBER.fullmatch(cleaned)
    if match is None or not (match.group(2) or match.group(3)):
        return None
    sign, whole, fraction = match.group(1), match.group(2), (match.group(3) or "").rstrip("0")
    value = str(int(whole or "0")) + (f".{fraction}" if fraction else "")
    return "-" + value if sign == "-" and value != "0" else value


def final_number(generated: str) -> str | None:
    """The answer number of a generation, normalised, or None if it has none.

    Text from the first "Question:" on is dropped (the model may start another exemplar);
    a number after "####" wins, else the last number counts.
    """
    cut = generated.split("Question:", 1)[0]
    if "####" in cut:
        after = _NUMBER.findall(cut.rsplit("####", 1)[1])
        if after:
            return normalise_number(after[0])
    numbers = _NUMBER.findall(cut)
    return normalise_number(numbers[-1]) if numbers else None


def read_qa_jsonl(path: Path) -> list[QAExample]:
    """GSM8K-format records ({"question", "answer"} with "#### N" ending the answer)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file; pass a JSONL file of question/answer records")
    examples = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            examples.append(_parse_qa_line(line, f"{path}, line {lineno}"))
    return examples


def _parse_qa_line(line: str, where: str) -> QAExample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UsageError(
            f"{where}: not valid JSON ({error.msg}); "
            "fix or remove that line") from None
    if not isinstance(record, dict) or not all(
        isinstance(record.get(key), str) for key in ("question", "answer")
    ):
        raise UsageError(
            f"{where}: needs string fields \"question\" and \"answer\"; fix that record")
    answer = record["answer"]
    final = normalise_number(answer.rsplit("####", 1)[1]) if "####" in answer else None
    if final is None:
        raise UsageError(
            f"{where}: the answer has no final number after '####'; end it with '#### N'")
    return QAExample(question=record["question"], answer=answer, final=final)


def qa_prompt(exemplars: list[QAExample], question: str) -> str:
    """Worked exemplars then the open question, in the "Question:/Answer:" format."""
    shown = "".join(f"Question: {e.question}\nAnswer: {e.answer}\n\n" for e in exemplars)
    return f"{shown}Question: {question}\nAnswer:"


def draw_exemplars(train: list[QAExample], shots: int, seed: int) -> list[QAExample]:
    """``shots`` distinct exemplars from ``train`` only, reproducible from ``seed``."""
    _check_count("shots", shots, minimum=0, maximum=len(train))
    return random.Random(seed).sample(train, shots)


def overlapping_questions(train: list[QAExample], test: list[QAExample]) -> list[str]:
    """Test questions that also appear in train: exemplars from train would leak them."""
    seen = {e.question.strip() for e in train}
    return [e.question for e in test if e.question.strip() in seen]


def score_predictions(examples: list[QAExample], generations: list[str]) -> dict:
    """Exact-match accuracy of each generation's final number (accuracy 0.0 if empty)."""
    if len(examples) != len(generations):
        raise UsageError(
            f"{len(examples)} examples but {len(generations)} generations; pass one per example")
    correct = sum(
        final_number(gen) == example.final for example, gen in zip(examples, generations)
    )
    total = len(examples)
    return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0}


def blind_guess_accuracy(task: PermutationTask) -> float:
    """Accuracy on eval items of answering with one fixed rule, ignoring the examples (by
    symmetry every fixed rule scores the same when rules are uniform): the 0-shot chance level.

    Above 1 / rules because strings with repeated symbols look the same under several rules.
    """
    guess = task.rules[0]
    hits = sum(apply(guess, item) == apply(rule, item)
               for item in task.eval_items for rule in task.rules)
    return hits / (len(task.eval_items) * len(task.rules))
