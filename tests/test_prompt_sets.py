"""Evaluation prompt sets (`prompts.sets`): shipped sets, held-out paraphrases, fixed seeds and user CSV files."""

import re

import pytest

from prompts.sets import (
    DOMAIN_SETS,
    ROLES,
    csv_prompt_set,
    find_concept,
    load_prompt_set,
    read_prompt_csv,
)
from prompts.shapes import ATTRIBUTES, load_shapes_vocab

VOCAB = load_shapes_vocab()
SHAPES_CONCEPTS = [(a, c) for a in ATTRIBUTES for c in VOCAB.classes(a)]


def _words(attribute: str, name: str) -> list[str]:
    words = VOCAB.words(attribute, name)
    return words + (VOCAB.style_postfixes(name) if attribute == "style" else [])


def _mentions(prompt: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", prompt) is not None


@pytest.mark.parametrize(("attribute", "concept"), SHAPES_CONCEPTS)
def test_every_shapes_class_has_all_four_roles_with_the_right_words(attribute, concept):
    s = load_prompt_set("shapes", concept)
    assert s.task == attribute and s.concept == concept
    assert all(s.by_role(role) for role in ROLES)
    canonical, *synonyms = VOCAB.words(attribute, concept)
    for row in s.by_role("target"):  # canonical word only: the synonyms stay held out of training
        assert row.asked[attribute] == concept
        assert not any(_mentions(row.prompt, w) for w in synonyms), row.prompt
    paraphrases = [r.prompt for r in s.by_role("paraphrase")]
    assert set(paraphrases).isdisjoint(s.training_prompts())
    for word in synonyms:
        assert any(_mentions(p, word) for p in paraphrases), word
    others = [c for c in VOCAB.classes(attribute) if c != concept]
    for row in s.by_role("retain_in"):  # the same family, never the concept itself
        assert set(row.asked) == {attribute} and row.asked[attribute] in others
        assert not any(_mentions(row.prompt, w) for w in _words(attribute, concept)), row.prompt
    for row in s.by_role("retain_cross"):  # other families: the concept's attribute is not named at all
        assert attribute not in row.asked and row.asked
        assert not any(_mentions(row.prompt, w) for c in VOCAB.classes(attribute) for w in _words(attribute, c))


def test_sets_are_deterministic_with_fixed_evaluation_seeds():
    a, b = load_prompt_set("shapes", "red"), load_prompt_set("shapes", "red")
    assert a.rows == b.rows and a.fingerprint() == b.fingerprint()
    assert len({r.evaluation_seed for r in a.rows}) == len(a.rows)
    two = load_prompt_set("shapes", "red", seeds_per_prompt=2)
    assert [r.prompt for r in two.rows][:2] == [two.rows[0].prompt] * 2  # each prompt with two distinct seeds
    assert len(load_prompt_set("shapes", "red", seeds_per_prompt=1).rows) * 2 == len(two.rows)


def test_concepts_resolve_through_synonyms_and_across_sets():
    assert load_prompt_set("shapes", "crimson").concept == "red"
    assert load_prompt_set(None, "Vincent van Gogh").concept == "Van Gogh"
    assert find_concept("chainsaw") == ("imagenette", "chain saw")
    assert find_concept("naked") == ("nudity", "nudity")
    assert find_concept("unicorn") is None


@pytest.mark.parametrize("name", DOMAIN_SETS)
def test_real_model_starter_sets_cover_every_class(name):
    from prompts.sets import _domain

    data = _domain(name)
    for concept in data.get("concepts", data["classes"]):
        s = load_prompt_set(name, concept)
        assert s.by_role("target") and s.by_role("retain_cross"), concept
        assert s.by_role("paraphrase"), concept
        assert all(r.asked[s.task] == concept for r in s.by_role("target"))
        assert all(r.asked[s.task] != concept for r in s.by_role("retain_in"))
        for row in s.rows:  # every asked class is one the judge can name
            assert all(c in s.tasks[t].classes for t, c in row.asked.items())
        for row in s.by_role("paraphrase"):  # held out: never the name a trainer sees
            assert concept.casefold() not in row.prompt.casefold(), row.prompt
    imagenette = load_prompt_set("imagenette", "church")
    assert imagenette.by_role("target")[0].prompt == "Image of church"  # ESD's object template
    assert len(load_prompt_set("imagenette", "church").tasks["object"].classes) == 10
    with pytest.raises(ValueError, match="use one of nudity"):  # the judge's alternative is not erasable
        load_prompt_set("nudity", "clothed")


def test_unknown_concept_and_unknown_set_are_one_line_errors():
    with pytest.raises(ValueError, match=r"unknown concept 'magenta' for prompt set 'shapes': use one of red") as e:
        load_prompt_set("shapes", "magenta")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown prompt set 'cats'"):
        load_prompt_set("cats", "red")
    with pytest.raises(ValueError, match="no shipped prompt set knows the concept 'unicorn'"):
        load_prompt_set(None, "unicorn")
    with pytest.raises(ValueError, match="empty concept"):
        load_prompt_set("shapes", "  ")


def test_a_prompt_set_round_trips_through_csv(tmp_path):
    s = load_prompt_set("shapes", "striped", seeds_per_prompt=1, max_per_template=3)
    back = csv_prompt_set(s.write_csv(tmp_path / "striped.csv"), "striped")
    assert back.rows == s.rows and back.task == "style"


def test_an_esd_style_artist_csv(tmp_path):
    path = tmp_path / "big_artist_prompts.csv"
    path.write_text(
        "case_number,prompt,evaluation_seed,artist\n"
        "0,A Wheatfield with Cypresses by Vincent van Gogh,2219,Van Gogh\n"
        "1,Starry Night by Van Gogh,4965,Van Gogh\n"
        "2,The Persistence of Memory by Salvador Dali,1212,Salvador Dali\n"
        "3,A portrait by Frida Kahlo,77,Frida Kahlo\n"
    )
    s = load_prompt_set(str(path), "van gogh")
    assert s.concept == "Van Gogh" and s.task == "artist"
    assert [r.role for r in s.rows] == ["target", "target", "retain_in", "retain_in"]
    assert [r.evaluation_seed for r in s.rows] == [2219, 4965, 1212, 77]
    assert "Frida Kahlo" in s.tasks["artist"].classes  # a class only the CSV knows joins the judge's classes


def test_a_csv_with_only_prompt_and_seed_asks_for_the_concept(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("prompt,evaluation_seed\na church on a hill,5\nan old chapel,6\n")
    s = load_prompt_set(str(path), "church")
    assert [r.case_number for r in s.rows] == [0, 1]
    assert all(r.role == "target" and r.asked == {"object": "church"} for r in s.rows)


def test_a_csv_with_its_own_classes(tmp_path):
    path = tmp_path / "own.csv"
    path.write_text("prompt,evaluation_seed,class\na photo of a zebra,1,zebra\na photo of a horse,2,horse\n")
    s = load_prompt_set(str(path), "zebra")
    assert s.task == "class" and list(s.tasks["class"].classes) == ["zebra", "horse"]
    assert [r.role for r in s.rows] == ["target", "retain_in"]
    with pytest.raises(ValueError, match="add a 'class' column"):
        path.write_text("prompt,evaluation_seed\na photo of a zebra,1\n")
        load_prompt_set(str(path), "zebra")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prompt,seed\na,1\n", r"lacks the column\(s\) evaluation_seed"),
        ("prompt,evaluation_seed\n", "has no rows"),
        ("prompt,evaluation_seed\na cat,abc\n", r"line 2: evaluation_seed 'abc' is not an integer"),
        ("prompt,evaluation_seed\n,3\n", "line 2: empty prompt"),
        ("prompt,evaluation_seed,role\na cat,3,forget\n", "role 'forget' is not one of"),
    ],
)
def test_bad_csv_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        read_prompt_csv(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_missing_csv_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prompt_set(str(tmp_path / "none.csv"), "red")


def test_csv_classes_resolve_through_the_shipped_words_and_other_tasks_are_cross_domain(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text(
        "prompt,evaluation_seed,class,asked\n"
        "a chapel on a hill,1,chapel,\n"
        "an old cathedral,2,,object=cathedral\n"
        "a parachute over a field,3,parachute,\n"
        "a painting by the painter of The Kiss,4,,artist=Klimt\n"
    )
    s = load_prompt_set(str(path), "church")
    assert [r.role for r in s.rows] == ["target", "target", "retain_in", "retain_cross"]
    assert [r.asked for r in s.rows][-1] == {"artist": "Gustav Klimt"}
    assert "chapel" not in s.tasks["object"].classes  # a synonym is not a rival class


def test_out_of_range_seeds_are_refused(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_text("prompt,evaluation_seed\na cat,99999999999999999999999\n")
    with pytest.raises(ValueError, match=r"line 2: evaluation_seed .* is outside 0 \.\. 2\*\*63-1"):
        read_prompt_csv(path)
