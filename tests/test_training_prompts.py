"""Training prompts never include the held-out paraphrases, and training seeds never equal evaluation seeds."""

import pytest

from prompts.sets import load_prompt_set
from prompts.training import (
    TRAINING_SEED_BASE,
    concept_prompts,
    default_guide,
    neutral_prompt,
    replace_word,
    shared_retain,
    training_seeds,
)


@pytest.mark.parametrize("concept", ["red", "circle", "striped", "Van Gogh", "church"])
def test_training_prompts_hold_out_every_paraphrase(concept):
    prompts = concept_prompts(concept)
    evaluation = load_prompt_set(None, concept, seeds_per_prompt=4)
    held_out = {r.prompt for r in evaluation.by_role("paraphrase")}
    assert prompts.targets and held_out
    assert not held_out & set(prompts.targets) and not held_out & set(prompts.retain)
    assert set(prompts.targets) == set(evaluation.training_prompts())


@pytest.mark.parametrize("concept", ["red", "circle", "striped"])
def test_shapes_retain_prompts_never_name_the_concept_or_a_synonym(concept):
    prompts = concept_prompts(concept)
    evaluation = load_prompt_set("shapes", concept)
    words = [w for r in evaluation.by_role("paraphrase") for w in r.prompt.split()]
    assert len(prompts.retain) > 100
    for prompt in prompts.retain:
        assert concept not in prompt.split(), prompt
    synonyms = {"red": ["crimson", "scarlet"], "circle": ["disc"], "striped": ["stripy", "lined", "stripes"]}[concept]
    assert any(s in words for s in synonyms)  # the synonyms are held out, not absent
    assert not any(s in p.split() for p in prompts.retain for s in synonyms)


def test_training_seeds_never_equal_evaluation_seeds():
    evaluation_seeds = {
        r.evaluation_seed
        for c in ("red", "circle", "striped")
        for r in load_prompt_set("shapes", c, seeds_per_prompt=8).rows
    }
    seeds = training_seeds(0, 10_000)
    assert min(seeds) >= TRAINING_SEED_BASE > max(evaluation_seeds)
    assert not set(seeds) & evaluation_seeds
    assert training_seeds(0, 5) == training_seeds(0, 5) != training_seeds(1, 5)


def test_word_replacement_and_neutral_prompts():
    assert replace_word("a red apple", "red", "orange") == "an orange apple"
    assert neutral_prompt("a red striped circle", "red", "colour") == "a striped circle"
    assert neutral_prompt("a circle", "circle", "shape") == "a shape"
    assert neutral_prompt("a striped shape", "striped", "style") == "a shape"
    assert replace_word("Van Gogh style painting", "van gogh", "art") == "art style painting"
    with pytest.raises(ValueError, match="does not contain the concept word"):
        replace_word("a blue square", "red", "")


def test_several_concepts_share_retain_prompts_naming_none_of_them():
    concepts = [concept_prompts(c) for c in ("red", "green", "blue")]
    retain = shared_retain(concepts)
    assert retain and not any(w in p.split() for p in retain for w in ("red", "green", "blue"))
    assert [default_guide(concepts, i) for i in range(3)] == ["yellow", "purple", "yellow"]
    assert default_guide([concept_prompts("Van Gogh")], 0) == "art"
