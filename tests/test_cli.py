import subprocess
import sys

import pytest

from erase.cli import main
from pipelines.shapes.clip import load_clip, read_clip_metadata


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("erase: error:")
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["paint"], "invalid choice: 'paint'"),
        ([], "required: COMMAND"),
        (["world"], "required: WORLD_COMMAND"),
        (["world", "fly"], "invalid choice: 'fly'"),
        (["world", "train", "--steps", "many"], "--steps must be an integer of at least 1, got 'many'"),
        (["world", "train", "--steps", "0"], "--steps must be an integer of at least 1, got 0"),
        (["world", "train", "--only", "referee"], "invalid choice: 'referee'"),
        (["world", "train", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--n", "0"], "--n must be an integer from 1 to 10000, got 0"),
        (["world", "train", "--pool-size", "8", "--quiet"], "pool_size (8) must be at least batch_size (256)"),
    ],
)
def test_bad_commands_give_one_line_errors(capsys, argv, expected):
    assert main(argv) == 2
    assert expected in _one_line_error(capsys)


def test_unwritable_output_is_a_one_line_error(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert (
        main(
            [
                "world",
                "train",
                "--only",
                "judge",
                "--steps",
                "1",
                "--batch-size",
                "8",
                "--pool-size",
                "32",
                "--eval-n",
                "0",
                "--quiet",
                "--out",
                str(blocker / "sub"),
            ]
        )
        == 2
    )
    # checked with the other outputs before training: the message names the file in the way
    assert f"cannot write --out {blocker / 'sub'}: {blocker} is a file, not a folder" in _one_line_error(capsys)


def test_world_train_at_toy_size_writes_a_loadable_clip(tmp_path, capsys):
    argv = [
        "world",
        "train",
        "--only",
        "judge",
        "--steps",
        "3",
        "--batch-size",
        "16",
        "--pool-size",
        "64",
        "--threads",
        "1",
        "--eval-n",
        "30",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    path = tmp_path / "clip_judge.safetensors"
    model = load_clip(path)
    assert model.context_length == 32
    meta = read_clip_metadata(path)
    assert meta["erase.config"]["steps"] == 3 and meta["erase.accuracy"]["n"] == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_judge.safetensors"]  # no temp files left


def test_console_script_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "erase", "world", "nope"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "invalid choice: 'nope'" in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "erase", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "world" in help_text.stdout


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["generate", "--model", "no-such-model", "--prompt", "a red circle", "--out", "OUT"], "no-such-model"),
        (["generate", "--model", "shapes", "--prompt", "   ", "--out", "OUT"], "--model needs a non-empty --prompt"),
        (["generate", "--model", "shapes", "--out", "OUT"], "--model needs a non-empty --prompt"),
        (
            ["generate", "--gan", "shapes", "--prompt", "a red circle", "--out", "OUT"],
            "--prompt does not apply to --gan",
        ),
        (["generate", "--gan", "mystery", "--out", "OUT"], "unknown GAN 'mystery'"),
        (["generate", "--model", "shapes", "--gan", "shapes", "--out", "OUT"], "not allowed with argument"),
        (["generate", "--prompt", "a red circle", "--out", "OUT"], "one of the arguments --model --gan is required"),
        (
            ["generate", "--model", "shapes", "--prompt", "a", "--n", "0", "--out", "OUT"],
            "--n must be an integer from 1 to 1000, got 0",
        ),
    ],
)
def test_generate_bad_input_gives_one_line_errors(capsys, tmp_path, argv, expected):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    assert expected in _one_line_error(capsys)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_generate_to_an_unwritable_folder_is_a_one_line_error(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["generate", "--gan", "shapes", "--n", "2", "--out", str(blocker / "sub")]) == 2
    assert f"{blocker} is a file, not a folder" in _one_line_error(capsys)
