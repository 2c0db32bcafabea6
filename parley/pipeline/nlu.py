"""Intent and slot understanding: what the user wants, and the values they named.

    intents = load_intents()                          # the shipped parley/data/intents.yml
    classifier = IntentClassifier.train(intents, Embedder.load())
    classifier.predict("open example.com/news")       # Intent(name="web_lookup", confidence=0.9, ...)
    extract_slots("remind me tomorrow at 3pm")        # {"date": "2026-...", "time": "15:00"}
    Pipeline([NLUStage(default_classifier(embedder)), ...])

Intents live in a small hand-edited YAML file (its format is described at its top). Each
example becomes a feature vector: its sentence embedding (what it is about) beside hashed
counts of its words and word pairs (how it is put: "forget that I live in Porto" and "I live
in Porto" embed alike but differ in words), as Rasa sets sparse word features beside dense
ones. A softmax layer (one weight row per intent) is trained on those vectors: full batch,
fixed seed, weight decay, a few hundred steps, a second or two on a CPU. That layer is the
only learned part, so it is saved as one small safetensors file whose metadata carries the
intent names, their slot patterns and the SHA-256 of the intents file it learned from;
`default_classifier` retrains when the file changed. When the most likely intent's
probability is under `threshold`, the turn is `out_of_scope`, so gibberish routes nowhere.

Slots come from rules, not learning (`extract_slots`): URLs, e-mails, dates, times,
numbers, names after cues ("my sister is called Ana"), the topic after "about"; then the
regular expressions the predicted intent declares in the YAML file, which win on a clash.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import reprlib
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from parley.config import parse_cli, setting
from parley.files import NotRegularFile, atomic_open, read_regular
from parley.pipeline.frames import Frame, Intent, Slots, UserText
from parley.pipeline.runner import Stage, Turn
from parley.pipeline.urls import url_span
from parley.registry import parley_home

DEFAULT_INTENTS = Path(__file__).resolve().parent.parent / "data" / "intents.yml"
OUT_OF_SCOPE = "out_of_scope"
DEFAULT_THRESHOLD = 0.5
HEAD_FORMAT = "parley-intent-head-1"  # bump when the features below change
NGRAM_BUCKETS = 2048
NGRAM_WEIGHT = 0.5  # length of the word-count part beside the unit-length embedding
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
INTENT_KEYS = {"name", "description", "examples", "slots"}


class IntentsError(ValueError):
    pass


@dataclass(frozen=True)
class IntentSpec:
    name: str
    description: str
    examples: tuple[str, ...]
    slots: Mapping[str, re.Pattern] = field(default_factory=dict)  # slot name -> pattern


@dataclass(frozen=True)
class IntentSet:
    intents: tuple[IntentSpec, ...]
    path: Path
    sha256: str  # of the file's bytes: a head trained on other bytes is stale

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.intents]

    def __iter__(self) -> Iterator[IntentSpec]:
        return iter(self.intents)


def default_head_path() -> Path:
    return parley_home() / "nlu" / "intent_head.safetensors"


# --- the intents file ----------------------------------------------------------------------


def load_intents(path: str | Path | None = None) -> IntentSet:
    """Read and check an intents file; every problem is an `IntentsError` naming the place."""
    path = Path(path) if path is not None else DEFAULT_INTENTS
    try:
        raw = read_regular(path)  # a FIFO would block the read, a device never end
    except FileNotFoundError:
        raise IntentsError(f"{path}: no such intents file (pass an existing file, or leave it out "
                           f"to use the shipped {DEFAULT_INTENTS})") from None
    except NotRegularFile:
        raise IntentsError(f"{path}: not a regular file (a folder, pipe or device); give the intents YAML file") from None
    except OSError as e:
        raise IntentsError(f"{path}: cannot read the intents file: {e.strerror}") from None
    try:
        doc = yaml.load(raw, _UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise IntentsError(f"{path}{at}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise IntentsError(f"{path}: not readable as YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise IntentsError(f"{path}: nested too deeply to be an intents file (see the format described at the "
                           f"top of {DEFAULT_INTENTS.name})") from None
    items = doc.get("intents") if isinstance(doc, dict) else None
    if not isinstance(items, list) or len(items) < 2:
        raise IntentsError(f"{path}: expected a mapping with `intents:`, a list of at least two intents "
                           f"(see the format described at the top of {DEFAULT_INTENTS.name})")
    intents: list[IntentSpec] = []
    owner: dict[str, str] = {}  # normalised example -> intent that has it
    for i, item in enumerate(items):
        spec = _check_intent(item, path, i)
        if spec.name in {s.name for s in intents}:
            raise IntentsError(f"{path}: intent {spec.name!r} is defined twice: merge the two entries")
        for text in spec.examples:
            key = " ".join(text.lower().split())
            if key in owner:
                raise IntentsError(f"{path}: intent {spec.name!r}, field examples: {text!r} is already an "
                                   f"example of {owner[key]!r}; an utterance can teach only one intent")
            owner[key] = spec.name
        intents.append(spec)
    return IntentSet(tuple(intents), path, hashlib.sha256(raw).hexdigest())


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, but a key written twice in one mapping is an error: PyYAML keeps the last
    silently, so a second `examples:` would drop the first list without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key_node.value!r} is written "
                                                            "twice in one mapping: keep one", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _short(value: Any) -> str:
    """A bounded repr: YAML aliases can make a value of billions of shared items, whose whole repr
    in an error message would never finish."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, 60, 60
    return r.repr(value)


def _check_intent(item: Any, path: Path, index: int) -> IntentSpec:
    where = f"{path}: intent #{index + 1}"
    if not isinstance(item, dict):
        raise IntentsError(f"{where}: expected a mapping with name, description and examples")
    name = item.get("name")
    if name is None:
        raise IntentsError(f"{where}: missing `name`")
    if not isinstance(name, str) or not NAME.match(name) or name == OUT_OF_SCOPE:
        raise IntentsError(f"{where}, field name: {_short(name)} is not a valid intent name (lowercase letters, "
                           f"digits and '_', starting with a letter; {OUT_OF_SCOPE!r} is reserved)")
    where = f"{path}: intent {name!r}"
    unknown = sorted(set(item) - INTENT_KEYS)
    if unknown:
        raise IntentsError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(INTENT_KEYS))})")
    description = item.get("description")
    if not isinstance(description, str) or not description.strip():
        raise IntentsError(f"{where}, field description: give a one-line description")
    examples = item.get("examples")
    if not isinstance(examples, list) or len(examples) < 2:
        raise IntentsError(f"{where}, field examples: give a list of at least 2 example utterances "
                           f"(25-40 varied ones work best)")
    for text in examples:
        if not isinstance(text, str) or not text.strip():
            raise IntentsError(f"{where}, field examples: {_short(text)} is not a non-empty string")
    slots = item.get("slots") or {}
    if not isinstance(slots, dict):
        raise IntentsError(f"{where}, field slots: expected a mapping of slot name -> regular expression")
    patterns = {}
    for slot, pattern in slots.items():
        if not isinstance(slot, str) or not NAME.match(slot):
            raise IntentsError(f"{where}, field slots: {_short(slot)} is not a valid slot name")
        patterns[slot] = _compile(pattern, f"{where}, field slots.{slot}")
    return IntentSpec(name, description.strip(), tuple(t.strip() for t in examples), patterns)


def _compile(pattern: Any, where: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise IntentsError(f"{where}: expected a regular expression as a string, got {_short(pattern)}")
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise IntentsError(f"{where}: bad regular expression {pattern!r}: {e}") from None


# --- the classifier ------------------------------------------------------------------------


def features(texts: list[str], embedder: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """(n, dim + NGRAM_BUCKETS) float32: each text's embedding, then its hashed word and
    word-pair counts scaled to length NGRAM_WEIGHT (crc32, so the same on every run)."""
    counts = np.zeros((len(texts), NGRAM_BUCKETS), dtype=np.float32)
    for row, text in enumerate(texts):
        words = re.findall(r"[a-z0-9']+|[?!]", text.lower())
        for gram in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
            counts[row, zlib.crc32(gram.encode()) % NGRAM_BUCKETS] += 1
    norms = np.linalg.norm(counts, axis=1, keepdims=True)
    counts *= NGRAM_WEIGHT / np.maximum(norms, 1e-9)
    return np.concatenate([np.asarray(embedder(texts), dtype=np.float32), counts], axis=1)


class IntentClassifier:
    """A softmax layer over `features`; `predict` gives an `Intent` frame."""

    def __init__(self, names: Sequence[str], weight: np.ndarray, bias: np.ndarray,
                 embedder: Callable[[list[str]], np.ndarray], intents_sha256: str,
                 slot_patterns: Mapping[str, Mapping[str, re.Pattern]] | None = None,
                 threshold: float = DEFAULT_THRESHOLD):
        self.names = list(names)
        self.weight = np.asarray(weight, dtype=np.float32)  # (intents, features)
        self.bias = np.asarray(bias, dtype=np.float32)
        self.embedder = embedder
        self.intents_sha256 = intents_sha256
        self.slot_patterns = dict(slot_patterns or {})
        self.threshold = threshold

    @property
    def threshold(self) -> float:
        """Below this top probability a prediction is `out_of_scope`."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise IntentsError(f"the intent threshold must be a probability in [0, 1], got {value}")
        self._threshold = float(value)

    @classmethod
    def train(cls, intents: IntentSet, embedder: Callable[[list[str]], np.ndarray], *,
              threshold: float = DEFAULT_THRESHOLD, steps: int = 300, lr: float = 0.1,
              weight_decay: float = 5e-5, seed: int = 0) -> IntentClassifier:
        texts = [t for spec in intents for t in spec.examples]
        labels = torch.tensor([k for k, spec in enumerate(intents) for _ in spec.examples])
        x = torch.from_numpy(features(texts, embedder))
        counts = torch.bincount(labels).float()
        balance = counts.sum() / (len(counts) * counts)  # intents with fewer examples count as much
        generator = torch.Generator().manual_seed(seed)
        weight = (torch.randn(len(counts), x.shape[1], generator=generator) * 0.01).requires_grad_()
        bias = torch.zeros(len(counts), requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny problem: more threads only add hand-offs (5x slower on a busy CPU)
        try:
            for _ in range(steps):
                optimizer.zero_grad()
                loss = F.cross_entropy(x @ weight.T + bias, labels, weight=balance) + weight_decay * weight.square().sum()
                loss.backward()
                optimizer.step()
        finally:
            torch.set_num_threads(threads)
        patterns = {spec.name: spec.slots for spec in intents if spec.slots}
        return cls(intents.names, weight.detach().numpy(), bias.detach().numpy(), embedder, intents.sha256,
                   patterns, threshold)

    def is_current(self, intents: IntentSet) -> bool:
        """Was this head trained on exactly this intents file?"""
        return self.intents_sha256 == intents.sha256 and self.names == intents.names

    def predict(self, text: str) -> Intent:
        return self.predict_many([text])[0]

    def predict_many(self, texts: Sequence[str]) -> list[Intent]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("predict_many takes a list of strings")
        out: list[Intent | None] = [Intent(OUT_OF_SCOPE, 0.0) if not t.strip() else None for t in texts]
        todo = [i for i, o in enumerate(out) if o is None]
        if todo:
            logits = features([texts[i] for i in todo], self.embedder) @ self.weight.T + self.bias
            logits = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            for i, p in zip(todo, probs):
                ranking = tuple((self.names[k], round(float(p[k]), 4)) for k in np.argsort(-p, kind="stable")[:3])
                name, confidence = ranking[0]
                out[i] = Intent(name if confidence >= self.threshold else OUT_OF_SCOPE, confidence, ranking)
        return out  # type: ignore[return-value]

    def save(self, path: str | Path) -> Path:
        """Write the head as one safetensors file, atomically (a crash leaves the old one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        slots = {intent: {s: p.pattern for s, p in pats.items()} for intent, pats in self.slot_patterns.items()}
        meta = {"format": HEAD_FORMAT, "names": json.dumps(self.names), "slots": json.dumps(slots),
                "intents_sha256": self.intents_sha256}
        data = safetensors_bytes({"weight": torch.from_numpy(self.weight), "bias": torch.from_numpy(self.bias)}, meta)
        with atomic_open(path, "wb") as f:
            f.write(data)
        return path

    @classmethod
    def load(cls, path: str | Path, embedder: Callable[[list[str]], np.ndarray],
             threshold: float = DEFAULT_THRESHOLD) -> IntentClassifier:
        path = Path(path)
        if not path.is_file():
            raise IntentsError(f"{path}: no intent head there; run `parley train intents` to make one")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                weight, bias = f.get_tensor("weight").numpy(), f.get_tensor("bias").numpy()
            names = json.loads(meta["names"])
            slots = {intent: {s: _compile(p, f"{path}: intent {intent!r}, slot {s}") for s, p in pats.items()}
                     for intent, pats in json.loads(meta["slots"]).items()}
            sha = meta["intents_sha256"]
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise IntentsError(f"{path}: not a Parley intent head ({e}); retrain with `parley train intents`") from None
        dim = getattr(embedder, "dim", weight.shape[-1] - NGRAM_BUCKETS) + NGRAM_BUCKETS
        if meta.get("format") != HEAD_FORMAT or weight.shape != (len(names), dim) or bias.shape != (len(names),):
            raise IntentsError(f"{path}: intent head has format {meta.get('format')!r} and shape {weight.shape} for "
                               f"{len(names)} intents and {dim}-d features; retrain with `parley train intents`")
        return cls(names, weight, bias, embedder, sha, slots, threshold)


def default_classifier(embedder: Callable[[list[str]], np.ndarray], intents_path: str | Path | None = None,
                       head_path: str | Path | None = None, threshold: float = DEFAULT_THRESHOLD) -> IntentClassifier:
    """The saved head if it was trained on this intents file, else a freshly trained one (saved
    for next time), so the first chat needs no manual training step."""
    intents = load_intents(intents_path)
    head = Path(head_path) if head_path is not None else default_head_path()
    if head.is_file():
        try:
            classifier = IntentClassifier.load(head, embedder, threshold)
            if classifier.is_current(intents):
                return classifier
        except IntentsError:
            pass  # unreadable or from an older format: a cache, so retrain over it
    classifier = IntentClassifier.train(intents, embedder, threshold=threshold)
    try:
        classifier.save(head)
    except OSError as e:
        warnings.warn(f"could not save the intent head to {head} ({e.strerror}); it will be retrained next time")
    return classifier


@dataclass
class IntentsConfig:
    data: str = setting("", f"intents YAML file ('' = the shipped {DEFAULT_INTENTS})")
    out: str = setting("", "where to write the head ('' = next to the embedding model, where the NLU stage looks)")


def train_intents_main(argv: list[str]) -> int:
    """`parley train intents [--data FILE] [--out FILE]`."""
    from parley.pipeline.embed import Embedder

    args = parse_cli(IntentsConfig, argv, prog="parley train intents")
    intents = load_intents(args.data or None)
    examples = [(t, spec.name) for spec in intents for t in spec.examples]
    start = time.perf_counter()
    classifier = IntentClassifier.train(intents, Embedder.load())
    seconds = time.perf_counter() - start
    predicted = classifier.predict_many([t for t, _ in examples])
    accuracy = sum(p.name == name for p, (_, name) in zip(predicted, examples)) / len(examples)
    out = classifier.save(args.out or default_head_path())
    print(f"trained {len(intents.intents)} intents on {len(examples)} examples from {intents.path} "
          f"in {seconds:.1f} s; held-in accuracy {accuracy:.1%}")
    print(f"saved {out}")
    return 0


# --- slots ---------------------------------------------------------------------------------

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
         r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\b\.?")
DATES = [re.compile(p, re.IGNORECASE) for p in (
    r"\b(?P<rel>today|tonight|tomorrow|yesterday)\b",
    r"\b(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})\b",
    rf"\b(?P<d>\d{{1,2}})(?:st|nd|rd|th)?(?: of)? (?P<mon>{MONTH})(?:,? (?P<y>\d{{4}}))?(?!\w)",
    rf"\b(?P<mon>{MONTH}) (?P<d>\d{{1,2}})(?:st|nd|rd|th)?\b(?:,? (?P<y>\d{{4}}))?",
    rf"\b(?P<wd>{'|'.join(WEEKDAYS)})\b")]
TIMES = [re.compile(p, re.IGNORECASE) for p in (
    r"\b(?P<h>1[0-2]|0?[1-9])(?::(?P<min>[0-5]\d))?\s*(?P<ap>[ap])\.?m\b\.?",
    r"\b(?P<h>[01]?\d|2[0-3]):(?P<min>[0-5]\d)\b",
    r"\b(?P<word>noon|midday|midnight)\b")]
NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?![\w])")
RELATIONS = ("sister|brother|mother|mom|mum|father|dad|wife|husband|partner|son|daughter|best friend|friend|"
             "boss|manager|colleague|girlfriend|boyfriend|grandmother|grandfather|grandma|grandpa|aunt|uncle|"
             "cousin|niece|nephew|teacher|doctor|neighbou?r")
PERSON_NAME = r"(?P<name>[A-Z][\w'-]*(?: [A-Z][\w'-]*){0,2})"
PERSONS = [  # (rule, strong): a weak cue counts only in mixed-case text, where names are capitalised
    (re.compile(rf"(?i:\b(?:my name is|my name's|i am called|i'm called|call me)) {PERSON_NAME}"), True),
    (re.compile(rf"(?i:\bmy (?P<rel>{RELATIONS})(?:'s name is| is called| is named)) {PERSON_NAME}"), True),
    (re.compile(rf"(?i:\bmy (?P<rel>{RELATIONS}) is) {PERSON_NAME}"), False),
]
NOT_NAMES = {"a", "an", "the", "not", "very", "so", "really", "just", "also", "still", "always", "never", "me",
             "you", "it", "called", "named", "sick", "tired", "here", "there", "back", "away", "home"}
TOPIC = re.compile(r"\babout (?P<topic>[^.?!,;:()\"]+)", re.IGNORECASE)
PRONOUNS = {"me", "you", "it", "that", "this", "them", "him", "her", "us", "myself", "yourself", "what", "anything"}


def extract_slots(text: str, patterns: Mapping[str, re.Pattern] | None = None,
                  today: dt.date | None = None) -> dict[str, Any]:
    """This turn's slot values: url (with https:// added to bare domains), email, date (ISO),
    time ("HH:MM"), number, person (+ relation), topic, then `patterns` (slot -> regex; the
    value is the group named like the slot, else group 1, else the whole match)."""
    today = today or dt.date.today()
    slots: dict[str, Any] = {}
    masked = text

    def take(slot: str, match: re.Match | tuple[int, int], value: Any) -> None:
        nonlocal masked
        start, end = match if isinstance(match, tuple) else match.span()
        if value is not None and slot not in slots:
            slots[slot] = value
            masked = masked[:start] + " " * (end - start) + masked[end:]

    if m := EMAIL.search(masked):
        take("email", m, m.group())
    if found := url_span(masked):
        take("url", found[1], found[0])
    for slot, rules, resolve in (("date", DATES, _date), ("time", TIMES, _time)):
        found = sorted((m for rule in rules if (m := rule.search(masked))), key=lambda m: m.start())
        for m in found:
            take(slot, m, resolve(m, today))
    if m := NUMBER.search(masked):
        number = m.group().replace(",", "")
        take("number", m, float(number) if "." in number else int(number))
    _person(text, slots)
    if (m := TOPIC.search(masked)) and (topic := _topic(m.group("topic"))):
        slots["topic"] = topic
    for slot, pattern in (patterns or {}).items():
        if m := pattern.search(text):
            value = m.group(slot) if slot in pattern.groupindex else m.group(1) if pattern.groups else m.group()
            if value and value.strip():
                slots[slot] = value.strip()
    return slots


def _date(m: re.Match, today: dt.date) -> str | None:
    parts = m.groupdict()
    if parts.get("rel"):
        shift = {"yesterday": -1, "tomorrow": 1}.get(parts["rel"].lower(), 0)
        return (today + dt.timedelta(days=shift)).isoformat()
    if parts.get("wd"):  # the coming one: next week's when it is today
        days = (WEEKDAYS.index(parts["wd"].lower()) - today.weekday()) % 7 or 7
        return (today + dt.timedelta(days=days)).isoformat()
    month = int(parts["m"]) if parts.get("m") else MONTHS.index(parts["mon"][:3].lower()) + 1
    try:
        return dt.date(int(parts["y"] or today.year), month, int(parts["d"])).isoformat()
    except ValueError:  # 31 February
        return None


def _time(m: re.Match, _today: dt.date) -> str:
    parts = m.groupdict()
    if parts.get("word"):
        return "00:00" if parts["word"].lower() == "midnight" else "12:00"
    hour, minute = int(parts["h"]), int(parts.get("min") or 0)
    if parts.get("ap"):
        hour = hour % 12 + (12 if parts["ap"].lower() == "p" else 0)
    return f"{hour:02d}:{minute:02d}"


def _person(text: str, slots: dict[str, Any]) -> None:
    lower = text == text.lower()  # typed without capitals: take the one word after a strong cue
    for rule, strong in PERSONS:
        m = rule.search(text.title() if lower else text) if strong or not lower else None
        if m and m.group("name").split()[0].lower() not in NOT_NAMES:
            slots["person"] = m.group("name").split()[0] if lower else m.group("name")
            if "rel" in rule.groupindex:
                slots["relation"] = m.group("rel").lower()
            return


def _topic(phrase: str) -> str | None:
    words = phrase.split()
    while words and words[-1].lower() in {"please", "again", "now", "on", "at", "in", "for", "from", "by"}:
        words.pop()
    while words and words[0].lower() in {"the", "a", "an"}:
        words.pop(0)
    if not words or " ".join(words).lower() in PRONOUNS:
        return None
    return " ".join(words[:8])


# --- the stage -----------------------------------------------------------------------------


class NLUStage(Stage):
    """On `UserText`: emits an `Intent` and this turn's `Slots`, then passes the text on (in
    that order, so stages downstream find both with `turn.get` when the text reaches them)."""

    name = "nlu"

    def __init__(self, classifier: IntentClassifier, today: Callable[[], dt.date] = dt.date.today):
        self.classifier = classifier
        self.today = today

    def process(self, frame: Frame, turn: Turn) -> Iterator[Frame]:
        if isinstance(frame, UserText):
            intent = self.classifier.predict(frame.text)
            slots = extract_slots(frame.text, self.classifier.slot_patterns.get(intent.name), self.today())
            turn.note(self.name, intent.name, confidence=intent.confidence,
                      ranking=[list(r) for r in intent.ranking], slots=slots)
            yield intent
            yield Slots(slots)
        yield frame
