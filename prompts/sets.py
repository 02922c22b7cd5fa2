"""Evaluation prompt sets: for one concept, the prompts that ask for it and the prompts that must survive its erasure.

A `PromptSet` holds rows in the field's CSV shape (``case_number, prompt, evaluation_seed``) plus two things an
evaluator needs: each row's **role** and what the row **asks for** (judge task -> class).

Roles:

- ``target``: the concept under its canonical name in the target templates. These are the prompts a trainer may
  use; ``erasure`` is measured on them.
- ``paraphrase``: held out from training: synonyms of the concept, other phrasings, descriptions without its
  name. ``generalization`` is measured on them.
- ``retain_in``: the same family (other colours when erasing a colour, other artists when erasing an artist);
  ``retention.in_domain`` (UnlearnCanvas's IRA).
- ``retain_cross``: other families, judged on what they ask for (UnlearnCanvas's CRA).

Shipped sets: ``shapes`` (the Shapes world, from ``data/shapes_world.json``) and starter sets for real models,
``artists``, ``imagenette`` and ``nudity`` (``data/<name>.json``). A user CSV with the columns the field uses
(``prompt,evaluation_seed[,case_number,...]``) loads with `load_prompt_set` too; see `read_prompt_csv`.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import random
import re
import zlib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from prompts.canvas import is_canvas_set, load_canvas_vocab
from prompts.shapes import ATTRIBUTES, SET_NAME, fix_articles, is_world_set, load_shapes_vocab

ROLES = ("target", "paraphrase", "retain_in", "retain_cross")
SHIPPED_SETS = ("shapes", "canvas", "artists", "imagenette", "nudity")
DOMAIN_SETS = ("artists", "imagenette", "nudity")  # the starter sets for real models (data/<name>.json)
CLASS_COLUMNS = ("class", "concept", "label", "artist", "object")  # column naming what a CSV row asks for
CSV_TEMPLATES = ("a photo of {}", "an image of {}", "a picture of {}")  # zero-shot templates for CSV-only classes


@dataclass(frozen=True)
class Task:
    """A zero-shot classification task of the judge: class name -> words averaged over, and prompt templates.

    Args:
        name (`str`): e.g. ``"colour"`` or ``"artist"``.
        classes (`dict[str, list[str]]`): class name -> the words that stand for it in the judge's prompts.
        templates (`list[str]`): zero-shot templates with one ``{}``.
    """

    name: str
    classes: dict[str, list[str]]
    templates: list[str]


@dataclass(frozen=True)
class PromptRow:
    """One generated image: its prompt, seed, role and what it asks for (task -> class)."""

    case_number: int
    prompt: str
    evaluation_seed: int
    role: str
    asked: dict[str, str] = field(default_factory=dict)


@dataclass
class PromptSet:
    """The prompts for evaluating the erasure of ``concept`` (a class of ``tasks[task]``).

    Args:
        name (`str`): the set's name (a shipped set) or the CSV path it came from.
        concept (`str`): the concept's canonical class name.
        task (`str`): the judge task the concept belongs to.
        rows (`list[PromptRow]`): every prompt and seed, in a fixed order.
        tasks (`dict[str, Task]`): every judge task a row asks about.
    """

    name: str
    concept: str
    task: str
    rows: list[PromptRow]
    tasks: dict[str, Task]

    def by_role(self, role: str) -> list[PromptRow]:
        if role not in ROLES:
            raise ValueError(f"unknown prompt role {role!r}: use one of {', '.join(ROLES)}")
        return [r for r in self.rows if r.role == role]

    def training_prompts(self) -> list[str]:
        """The distinct target prompts, in order: what a trainer may see (paraphrases stay held out)."""
        return list(dict.fromkeys(r.prompt for r in self.by_role("target")))

    def alternatives(self) -> list[str]:
        """The concept's alternatives: the other classes of its task."""
        return [c for c in self.tasks[self.task].classes if c != self.concept]

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) over every row and task: two sets with equal fingerprints ask the same."""
        blob = json.dumps(
            [[r.case_number, r.prompt, r.evaluation_seed, r.role, r.asked] for r in self.rows]
            + [[t.name, t.classes, t.templates] for t in self.tasks.values()],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "concept": self.concept,
            "task": self.task,
            "rows": {role: len(self.by_role(role)) for role in ROLES},
            "fingerprint": self.fingerprint(),
        }

    def write_csv(self, path: str | Path) -> Path:
        """Write the rows as CSV (``case_number,prompt,evaluation_seed,role,asked``); `read_prompt_csv` reads it
        back. ``asked`` is ``task=class`` pairs joined by ``;``."""
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["case_number", "prompt", "evaluation_seed", "role", "asked"])
        for r in self.rows:
            writer.writerow([r.case_number, r.prompt, r.evaluation_seed, r.role, _format_asked(r.asked)])
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(buffer.getvalue(), encoding="utf-8")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def _format_asked(asked: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in asked.items())


def list_prompt_sets() -> list[str]:
    return list(SHIPPED_SETS)


# ------------------------------------------------------------------------------------------------ shipped data
@cache
def _domain(name: str) -> dict:
    text = resources.files("prompts").joinpath(f"data/{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def _domain_task(name: str) -> Task:
    d = _domain(name)
    classes = {c: list(v.get("judge_words", [c])) for c, v in d["classes"].items()}
    return Task(d["task"], classes, list(d["zero_shot_templates"]))


def _domain_names(d: dict) -> dict[str, list[str]]:
    """Class -> every word that names it in a shipped domain (aliases, paraphrase words and judge words)."""
    return {
        c: [*v.get("aliases", []), *v.get("words", []), *v.get("judge_words", [])] for c, v in d["classes"].items()
    }


def _task_names(set_name: str) -> dict[str, dict[str, list[str]]]:
    """Task -> class -> every word naming it, over a shipped set's tasks (its own and its cross domain's)."""
    if is_world_set(set_name):
        vocab = load_shapes_vocab()
        return {
            a: {c: vocab.words(a, c) + (vocab.style_postfixes(c) if a == "style" else []) for c in vocab.classes(a)}
            for a in ATTRIBUTES
        }
    if is_canvas_set(set_name):
        canvas = load_canvas_vocab()
        return {
            a: {c: canvas.words(a, c) + (canvas.descriptions(c) if a == "style" else []) for c in canvas.classes(a)}
            for a in ("style", "object")
        }
    out = {}
    for name in filter(None, (set_name, _domain(set_name).get("cross_domain"))):
        out[_domain(name)["task"]] = _domain_names(_domain(name))
    return out


def _resolve(concept: str, names: dict[str, list[str]]) -> str | None:
    """The canonical class whose name or any of whose words equals ``concept`` (case-insensitive)."""
    key = concept.strip().casefold()
    for canonical, words in names.items():
        if key == canonical.casefold() or key in (w.casefold() for w in words):
            return canonical
    return None


def _shapes_names() -> dict[tuple[str, str], list[str]]:
    vocab = load_shapes_vocab()
    return {(a, c): vocab.words(a, c) for a in ATTRIBUTES for c in vocab.classes(a)}


def find_concept(concept: str) -> tuple[str, str] | None:
    """``(set name, canonical class)`` of the first shipped set that knows ``concept`` (by name or word)."""
    for (attribute, name), words in _shapes_names().items():
        if _resolve(concept, {name: words}):
            return SET_NAME, name
    canvas = load_canvas_vocab()
    for attribute in ("style", "object"):
        found = _resolve(concept, {c: canvas.words(attribute, c) for c in canvas.classes(attribute)})
        if found:
            return "canvas", found
    for set_name in DOMAIN_SETS:
        d = _domain(set_name)
        found = _resolve(concept, _domain_names(d))
        if found and found in d.get("concepts", d["classes"]):
            return set_name, found
    return None


def _pick(items: list, k: int, key: str) -> list:
    """At most ``k`` items: all of them, or ``k`` drawn without replacement by a generator seeded from ``key``
    (CRC-32, so the choice is the same on every machine and Python version), kept in their original order."""
    if len(items) <= k:
        return list(items)
    chosen = sorted(random.Random(zlib.crc32(key.encode())).sample(range(len(items)), k))
    return [items[i] for i in chosen]


class _RowBuilder:
    """Numbers rows and gives each prompt ``seeds`` consecutive evaluation seeds (seed = case number)."""

    def __init__(self, seeds: int):
        self.seeds = seeds
        self.rows: list[PromptRow] = []

    def add(self, prompt: str, role: str, asked: dict[str, str]) -> None:
        for _ in range(self.seeds):
            n = len(self.rows)
            self.rows.append(PromptRow(n, prompt, n, role, dict(asked)))


# ------------------------------------------------------------------------------------------------ Shapes world
def shapes_tasks(synonym_index: int | None = None) -> dict[str, Task]:
    """The judge's three Shapes tasks (colour, shape, style): each class named by its canonical word, or
    (``synonym_index=k``) by its k-th synonym only (e.g. "crimson" for red)."""
    return vocab_tasks(load_shapes_vocab(), ATTRIBUTES, synonym_index)


def vocab_tasks(vocab, attributes, synonym_index: int | None = None) -> dict[str, Task]:
    """A world's judge tasks from its vocabulary (``words``, ``classes``, ``zero_shot_templates``): each class named
    by its canonical word, or (``synonym_index=k``) by its k-th synonym only."""

    def word(a: str, c: str) -> str:
        options = vocab.words(a, c)
        return options[0] if synonym_index is None else options[1 + synonym_index % (len(options) - 1)]

    return {a: Task(a, {c: [word(a, c)] for c in vocab.classes(a)}, vocab.zero_shot_templates(a)) for a in attributes}


def _fill(template: str, words: dict[str, str]) -> str:
    return fix_articles(template.format(**words))


def _uses(template: str) -> list[str]:
    slots = set(re.findall(r"\{(\w+)\}", template))
    return [a for a in ATTRIBUTES if a in slots or (a == "style" and "style_post" in slots)]


def _shapes_prompts(
    template: str, fixed: dict[str, tuple[str, str]], limit: int, style_post: str | None = None
) -> list[tuple[str, dict]]:
    """Fill ``template``: ``fixed`` attributes (attribute -> (class, word)) stay, the others range over their classes
    (canonical words; a style's first postfix phrase unless ``style_post`` is given). Returns up to ``limit``
    ``(prompt, asked)`` pairs, a fixed pseudo-random choice among the combinations."""
    vocab = load_shapes_vocab()
    free = [a for a in _uses(template) if a not in fixed]
    out = []
    for combo in itertools.product(*(vocab.classes(a) for a in free)):
        classes = {**{a: c for a, (c, _) in fixed.items()}, **dict(zip(free, combo))}
        words = {a: vocab.words(a, c)[0] for a, c in classes.items()}
        words.update({a: w for a, (_, w) in fixed.items()})
        if "style" in classes:
            words["style_post"] = style_post or vocab.style_postfixes(classes["style"])[0]
        asked = {a: classes[a] for a in _uses(template)}
        out.append((_fill(template, words), asked))
    return _pick(out, limit, f"{template}|{sorted(fixed.items())}|{style_post}")


def shapes_prompt_set(
    concept: str, seeds_per_prompt: int | None = None, max_per_template: int | None = None
) -> PromptSet:
    """The Shapes world's evaluation set for one class (``"red"``, ``"circle"``, ``"striped"``, or a synonym)."""
    vocab = load_shapes_vocab()
    spec = vocab.raw["evaluation"]
    found = [(a, c) for (a, c), words in _shapes_names().items() if _resolve(concept, {c: words})]
    if not found:
        names = ", ".join(c for a in ATTRIBUTES for c in vocab.classes(a))
        raise ValueError(f"unknown concept {concept!r} for prompt set 'shapes': use one of {names} (or a synonym)")
    attribute, name = found[0]
    seeds = seeds_per_prompt or spec["seeds_per_prompt"]
    limit = max_per_template or spec["max_per_template"]
    rows = _RowBuilder(seeds)
    own = [t for t in spec["target_templates"] if attribute in _uses(t)]
    for template in own:
        for prompt, asked in _shapes_prompts(template, {attribute: (name, vocab.words(attribute, name)[0])}, limit):
            rows.add(prompt, "target", asked)
    synonyms = vocab.words(attribute, name)[1:]
    for template in own:  # the target phrasing with each held-out synonym
        for word in synonyms:
            share = max(1, limit // (2 * len(synonyms)))
            for prompt, asked in _shapes_prompts(template, {attribute: (name, word)}, share):
                rows.add(prompt, "paraphrase", asked)
    for template in (t for t in spec["paraphrase_templates"] if attribute in _uses(t)):
        if attribute == "style" and "{style_post}" in template:  # the style's postfix phrases ("with stripes")
            variants = [((name, ""), post) for post in vocab.style_postfixes(name)]
        else:
            variants = [((name, word), None) for word in vocab.words(attribute, name)]
        share = max(1, limit // (2 * len(variants)))
        for fixed, post in variants:
            for prompt, asked in _shapes_prompts(template, {attribute: fixed}, share, post):
                rows.add(prompt, "paraphrase", asked)
    for other in vocab.classes(attribute):
        if other != name:
            fixed = {attribute: (other, vocab.words(attribute, other)[0])}
            for prompt, asked in _shapes_prompts(spec["retain_template"], fixed, min(limit, spec["retain_per_class"])):
                rows.add(prompt, "retain_in", {attribute: asked[attribute]})
    for prompt, asked in _shapes_prompts(spec["cross_domain_templates"][attribute], {}, limit):
        rows.add(prompt, "retain_cross", asked)
    return PromptSet("shapes", name, attribute, rows.rows, shapes_tasks())


# ------------------------------------------------------------------------------------------------ Canvas world
def canvas_tasks(synonym_index: int | None = None) -> dict[str, Task]:
    """The judge's two Canvas tasks (style, object): each class named by its canonical word, or (``synonym_index=k``)
    by its k-th synonym only."""
    return vocab_tasks(load_canvas_vocab(), ("style", "object"), synonym_index)


def _canvas_uses(template: str) -> list[str]:
    slots = set(re.findall(r"\{(\w+)\}", template))
    return [a for a in ("style", "object") if a in slots or (a == "style" and "description" in slots)]


def _canvas_prompts(template: str, fixed: dict[str, tuple[str, str]], limit: int) -> list[tuple[str, dict]]:
    """Fill ``template``: ``fixed`` attributes (attribute -> (class, word or description)) stay, the others range
    over their classes (canonical words). Up to ``limit`` ``(prompt, asked)`` pairs, a fixed pseudo-random choice."""
    vocab = load_canvas_vocab()
    uses = _canvas_uses(template)
    free = [a for a in uses if a not in fixed]
    out = []
    for combo in itertools.product(*(vocab.classes(a) for a in free)):
        classes = {**{a: c for a, (c, _) in fixed.items()}, **dict(zip(free, combo))}
        words = {a: vocab.words(a, c)[0] for a, c in classes.items()}
        words.update({a: w for a, (_, w) in fixed.items()})
        words["description"] = words.get("style", "")
        out.append((fix_articles(template.format(**words)), {a: classes[a] for a in uses}))
    return _pick(out, limit, f"canvas|{template}|{sorted(fixed.items())}")


def canvas_prompt_set(
    concept: str, seeds_per_prompt: int | None = None, max_per_template: int | None = None
) -> PromptSet:
    """The Canvas world's evaluation set for one class: a style (an artist's name or surname) or an object.

    Targets are the target templates with the canonical name; paraphrases (held out from training) are the target
    templates with the synonym, the paraphrase templates with every word, and a style's descriptions (the implicit
    prompts that describe it without its name); in-domain retain rows are the other classes of the attribute, cross-
    domain rows name no class of it.
    """
    vocab = load_canvas_vocab()
    spec = vocab.raw["evaluation"]
    found = [
        (a, c) for a in ("style", "object") for c in vocab.classes(a) if _resolve(concept, {c: vocab.words(a, c)})
    ]
    if not found:
        raise ValueError(
            f"unknown concept {concept!r} for prompt set 'canvas': use a style (artist name), e.g. "
            f"{vocab.styles[0]!r}, or an object: {', '.join(vocab.objects)}"
        )
    attribute, name = found[0]
    seeds = seeds_per_prompt or spec["seeds_per_prompt"]
    limit = max_per_template or spec["max_per_template"]
    rows = _RowBuilder(seeds)
    own = [t for t in spec["target_templates"] if attribute in _canvas_uses(t)]
    for template in own:
        for prompt, asked in _canvas_prompts(template, {attribute: (name, name)}, limit):
            rows.add(prompt, "target", asked)
    synonyms = vocab.synonyms(attribute, name)
    for template in own:
        for word in synonyms:
            share = max(1, limit // (2 * len(synonyms)))
            for prompt, asked in _canvas_prompts(template, {attribute: (name, word)}, share):
                rows.add(prompt, "paraphrase", asked)
    for template in (t for t in spec["paraphrase_templates"] if attribute in _canvas_uses(t)):
        words = vocab.words(attribute, name)
        for word in words:
            for prompt, asked in _canvas_prompts(
                template, {attribute: (name, word)}, max(1, limit // (2 * len(words)))
            ):
                rows.add(prompt, "paraphrase", asked)
    if attribute == "style":
        for description in vocab.descriptions(name):
            for template in (t["text"] for t in vocab.description_templates):
                share = max(1, limit // 4)
                for prompt, asked in _canvas_prompts(template, {"style": (name, description)}, share):
                    rows.add(prompt, "paraphrase", asked)
    for other in vocab.classes(attribute):
        if other != name:
            fixed = {attribute: (other, other)}
            for prompt, asked in _canvas_prompts(spec["retain_template"], fixed, min(limit, spec["retain_per_class"])):
                rows.add(prompt, "retain_in", {attribute: asked[attribute]})
    for prompt, asked in _canvas_prompts(spec["cross_domain_templates"][attribute], {}, limit):
        rows.add(prompt, "retain_cross", asked)
    return PromptSet("canvas", name, attribute, rows.rows, canvas_tasks())


# ------------------------------------------------------------------------------------------------ real models
def domain_prompt_set(set_name: str, concept: str, seeds_per_prompt: int | None = None) -> PromptSet:
    """A starter set for real models (``artists``, ``imagenette``, ``nudity``) for one of its classes."""
    d = _domain(set_name)
    name = _resolve(concept, _domain_names(d))
    erasable = d.get("concepts", list(d["classes"]))
    if name not in erasable:
        raise ValueError(f"unknown concept {concept!r} for prompt set {set_name!r}: use one of {', '.join(erasable)}")
    task = d["task"]
    rows = _RowBuilder(seeds_per_prompt or d.get("seeds_per_prompt", 1))

    def filled(template: str, word: str) -> str:
        return fix_articles(template.format(word)) if "{}" in template else template

    for template in d["target_templates"]:
        rows.add(filled(template, name), "target", {task: name})
    for word in d["classes"][name].get("words", []):
        for template in d["paraphrase_templates"]:
            rows.add(filled(template, word), "paraphrase", {task: name})
    for text in d["classes"][name].get("descriptions", []):
        rows.add(text, "paraphrase", {task: name})
    retain = d.get("retain_prompts")
    if retain:
        for other, prompts in retain.items():
            for text in prompts:
                rows.add(text, "retain_in", {task: other})
    else:
        for i, other in enumerate(c for c in d["classes"] if c != name):
            template = d["target_templates"][i % len(d["target_templates"])]  # one prompt per other class, cycled
            rows.add(filled(template, other), "retain_in", {task: other})
    tasks = {task: _domain_task(set_name)}
    cross = d.get("cross_domain")
    if cross:
        c = _domain(cross)
        tasks[c["task"]] = _domain_task(cross)
        for i, other in enumerate(c["classes"]):
            template = c["target_templates"][i % len(c["target_templates"])]
            rows.add(filled(template, other), "retain_cross", {c["task"]: other})
    return PromptSet(set_name, name, task, rows.rows, tasks)


# ------------------------------------------------------------------------------------------------ user CSV files
def read_prompt_csv(path: str | Path) -> list[dict]:
    """Read a prompt CSV with the field's columns: ``prompt`` and ``evaluation_seed`` (required), ``case_number``
    (default: the row's index), and optionally ``role`` (one of `ROLES`), ``asked`` (``task=class;...``) and a
    class column (``class``, ``concept``, ``label``, ``artist`` or ``object``). Other columns are ignored.

    Returns one dict per row with keys ``case_number``, ``prompt``, ``evaluation_seed``, ``role``, ``asked``,
    ``class`` (missing values are ``None``).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"prompt CSV {path} is a folder: pass a .csv file or a shipped set name")
    if not path.is_file():
        raise FileNotFoundError(f"prompt CSV {path} not found: pass an existing .csv file or a shipped set name")
    try:
        return _read_rows(path)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"prompt CSV {path} is not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x}): pass a UTF-8 "
            ".csv file (save it as 'CSV UTF-8')"
        ) from None
    except csv.Error as err:
        raise ValueError(f"prompt CSV {path} is not a readable CSV ({err}): pass a UTF-8 .csv file") from None


def _read_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("prompt", "evaluation_seed") if c not in columns]
        if missing:
            raise ValueError(
                f"prompt CSV {path} lacks the column(s) {', '.join(missing)}: "
                "the header needs at least 'prompt,evaluation_seed'"
            )
        class_column = next((c for c in CLASS_COLUMNS if c in columns), None)
        rows = []
        for line, raw in enumerate(reader, start=2):
            raw = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not raw["prompt"]:
                raise ValueError(f"prompt CSV {path} line {line}: empty prompt; give every row a prompt")
            rows.append(
                {
                    "case_number": _int(raw.get("case_number") or str(len(rows)), path, line, "case_number"),
                    "prompt": raw["prompt"],
                    "evaluation_seed": _int(raw["evaluation_seed"], path, line, "evaluation_seed"),
                    "role": _role(raw.get("role") or None, path, line),
                    "asked": _parse_asked(raw.get("asked") or "", path, line),
                    "class": raw.get(class_column) if class_column else None,
                }
            )
    if not rows:
        raise ValueError(f"prompt CSV {path} has no rows: add at least one 'prompt,evaluation_seed' line")
    return rows


def _int(text: str, path: Path, line: int, column: str) -> int:
    match = re.fullmatch(r"(-?\d+)(\.0*)?", text)
    if match is None:
        raise ValueError(f"prompt CSV {path} line {line}: {column} {text!r} is not an integer")
    value = int(match.group(1))
    if column == "evaluation_seed" and not 0 <= value < 2**63:
        raise ValueError(f"prompt CSV {path} line {line}: evaluation_seed {value} is outside 0 .. 2**63-1")
    return value


def _role(text: str | None, path: Path, line: int) -> str | None:
    if text is not None and text not in ROLES:
        raise ValueError(f"prompt CSV {path} line {line}: role {text!r} is not one of {', '.join(ROLES)}")
    return text


def _parse_asked(text: str, path: Path, line: int) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if "=" not in part:
            raise ValueError(f"prompt CSV {path} line {line}: asked {text!r} must be 'task=class' pairs joined by ';'")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def csv_prompt_set(path: str | Path, concept: str) -> PromptSet:
    """A prompt set from a user CSV (see `read_prompt_csv`) for ``concept``.

    Where the rows' classes come from:

    - a row with ``asked`` uses it; otherwise a row with a class column asks for that class, and a row with neither
      asks for ``concept``;
    - class names resolve through the shipped set's words ("crimson" is red, "chapel" is church);
    - a row with ``role`` uses it; otherwise it is ``target`` when it asks for the concept, ``retain_in`` when it
      asks for another class of the concept's task, and ``retain_cross`` when it asks only about other tasks.

    Judge tasks: when a shipped set knows the concept (e.g. "Van Gogh", "church", "nudity", "red"), its tasks are
    used, extended by any class the CSV adds; otherwise one task named ``class`` over the CSV's classes, with
    generic templates (`CSV_TEMPLATES`), which needs at least two classes.
    """
    raw = read_prompt_csv(path)
    found = find_concept(concept)
    if found:
        if is_world_set(found[0]):
            base = shapes_prompt_set(found[1])
        elif is_canvas_set(found[0]):
            base = canvas_prompt_set(found[1])
        else:
            base = domain_prompt_set(found[0], found[1])
        tasks, task, name = dict(base.tasks), base.task, base.concept
        names = _task_names(found[0])
    else:
        classes = list(dict.fromkeys(r["class"] for r in raw if r["class"]))
        name = _resolve(concept, {c: [] for c in classes})
        if name is None or len(classes) < 2:
            raise ValueError(
                f"concept {concept!r} is not in any shipped prompt set and {path} does not name it among at least two "
                f"classes: add a 'class' column (the class each prompt asks for), or use --prompts with one of "
                f"{', '.join(SHIPPED_SETS)}"
            )
        task = "class"
        tasks = {task: Task(task, {c: [c] for c in classes}, list(CSV_TEMPLATES))}
        names = {task: {c: [] for c in classes}}

    def canonical(t: str, c: str) -> str:  # "crimson" -> "red", "chapel" -> "church"; unknown classes stay as given
        return _resolve(c, names.get(t, {})) or c

    rows = []
    for r in raw:
        if r["asked"]:
            asked = {t: canonical(t, c) for t, c in r["asked"].items()}
        else:
            asked = {task: canonical(task, r["class"]) if r["class"] else name}
        for t, c in asked.items():
            if t not in tasks:
                raise ValueError(
                    f"prompt CSV {path}: row {r['case_number']} asks about task {t!r}; known tasks: {', '.join(tasks)}"
                )
            if c not in tasks[t].classes:  # a class only the CSV knows: the judge learns its name
                tasks[t] = Task(t, {**tasks[t].classes, c: [c]}, tasks[t].templates)
        default_role = "target" if asked.get(task) == name else "retain_in" if task in asked else "retain_cross"
        rows.append(PromptRow(r["case_number"], r["prompt"], r["evaluation_seed"], r["role"] or default_role, asked))
    return PromptSet(str(path), name, task, rows, tasks)


def load_prompt_set(
    name_or_path: str | None,
    concept: str,
    *,
    seeds_per_prompt: int | None = None,
    max_per_template: int | None = None,
) -> PromptSet:
    """The evaluation prompts for ``concept``: from a shipped set (``shapes``, ``artists``, ``imagenette``,
    ``nudity``), a CSV file, or (``None``) the first shipped set that knows the concept.

    Raises a one-line `ValueError` for an unknown concept or an empty set.
    """
    if not concept or not concept.strip():
        raise ValueError("empty concept: pass the concept to evaluate, e.g. --concept red")
    if name_or_path is None:
        found = find_concept(concept)
        if found is None:
            raise ValueError(
                f"no shipped prompt set knows the concept {concept!r}: pass --prompts FILE.csv "
                f"(columns prompt,evaluation_seed[,case_number,class,role]) or one of {', '.join(SHIPPED_SETS)}"
            )
        name_or_path = found[0]
    if is_world_set(name_or_path):
        result = shapes_prompt_set(concept, seeds_per_prompt, max_per_template)
    elif is_canvas_set(name_or_path):
        result = canvas_prompt_set(concept, seeds_per_prompt, max_per_template)
    elif name_or_path in SHIPPED_SETS:
        result = domain_prompt_set(name_or_path, concept, seeds_per_prompt)
    elif str(name_or_path).lower().endswith(".csv") or Path(name_or_path).expanduser().exists():
        result = csv_prompt_set(Path(name_or_path).expanduser(), concept)
    else:
        raise ValueError(
            f"unknown prompt set {name_or_path!r}: use one of {', '.join(SHIPPED_SETS)} or the path of a .csv file"
        )
    if not result.by_role("target") and not result.by_role("paraphrase"):
        raise ValueError(
            f"prompt set {result.name!r} has no prompts asking for {result.concept!r}: "
            "add rows for the concept (role target or paraphrase)"
        )
    return result
