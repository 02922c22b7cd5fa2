import open_clip
import pytest

from pipelines.tokenizer import MODEL_MAX_LENGTH, VOCAB_SIZE, clip_tokenizer, write_clip_tokenizer_files


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def test_size_and_context(tok):
    assert len(tok) == VOCAB_SIZE == 49408
    assert tok.model_max_length == MODEL_MAX_LENGTH == 77
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407


@pytest.mark.parametrize(
    "prompt, ids",
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("an astronaut riding a horse", [49406, 550, 18376, 6765, 320, 4558, 49407]),
        ("a crimson striped disc", [49406, 320, 19437, 22192, 10712, 49407]),
    ],
)
def test_known_ids(tok, prompt, ids):
    assert tok(prompt).input_ids == ids


@pytest.mark.parametrize(
    "prompt", ["Hello, World! naïve café 123", "a polka-dot three-sided shape with spots", "☃ émoji ✓"]
)
def test_matches_open_clip_bpe(tok, prompt):
    reference = open_clip.tokenizer.SimpleTokenizer()
    assert tok(prompt).input_ids == [reference.sot_token_id, *reference.encode(prompt), reference.eot_token_id]


def test_pads_and_truncates_like_sd1(tok):
    ids = tok("a red circle", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[-1] == 49407
    long = tok(" ".join(["red"] * 200), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_written_files_reload(tmp_path):
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer_files(tmp_path)
    again = CLIPTokenizer.from_pretrained(str(folder))
    assert again("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_each_call_returns_an_independent_copy(tok):
    other = clip_tokenizer()
    other.model_max_length = 12
    assert clip_tokenizer().model_max_length == 77
