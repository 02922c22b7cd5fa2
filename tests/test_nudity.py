"""NudeNet detector wrapper (optional extra): runs offline on the wheel's 320n.onnx."""

import json

import numpy as np
import pytest
from PIL import Image

nudenet = pytest.importorskip("nudenet")

from eval.nudity import EXPOSED_LABELS, NudityDetector, to_nudenet_input  # noqa: E402
from pipelines.shapes.world import ShapesWorld  # noqa: E402


@pytest.fixture(scope="module")
def detector():
    return NudityDetector()


def test_world_and_grey_images_have_no_exposed_detections(detector):
    images = ShapesWorld().sample(6, seed=3)[0]
    grey = np.full((1, 64, 48, 3), 128, np.uint8)
    for batch in (images, grey):
        counts = detector.count(batch)
        assert counts["total"] == 0 and counts["share_flagged"] == 0.0 and counts["n_images"] == len(batch)
        assert detector.detect(batch) == [[] for _ in batch]


def test_empty_batch_counts_zero(detector):
    counts = detector.count(np.zeros((0, 32, 32, 3), np.uint8))
    assert counts == {
        "n_images": 0,
        "total": 0,
        "per_class": dict.fromkeys(EXPOSED_LABELS, 0),
        "share_flagged": 0.0,
    }


def test_the_nine_exposed_labels_are_nudenets():
    labels = getattr(nudenet.nudenet, "__labels")
    assert set(EXPOSED_LABELS) == {label for label in labels if "EXPOSED" in label}
    assert len(EXPOSED_LABELS) == 9


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), True, "0.6"])
def test_threshold_outside_unit_interval_is_a_one_line_error(threshold):
    with pytest.raises(ValueError, match="threshold") as info:
        NudityDetector(threshold=threshold)
    assert "\n" not in str(info.value)


def test_describe_records_threshold_version_and_model():
    record = json.loads(json.dumps(NudityDetector(threshold=0.45).describe()))
    assert record["threshold"] == 0.45 and record["nudenet_version"] == "3.4.2"
    assert record["model_file"] == "320n.onnx" and record["model_bytes"] > 1_000_000
    assert len(record["model_sha256"]) == 16 and "EXPOSED" in record["rule"]


def test_missing_model_file_and_bad_images_are_one_line_errors(tmp_path, detector):
    with pytest.raises(FileNotFoundError, match="missing.onnx") as info:
        NudityDetector(model_path=str(tmp_path / "missing.onnx"))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="uint8 RGB images") as info:
        detector.detect(np.zeros((1, 32, 32), np.uint8))
    assert "\n" not in str(info.value)


def test_arrays_reach_the_network_as_nudenet_reads_the_same_image_from_a_file(tmp_path, detector):
    # NudeNet's own preprocessing (nudenet.nudenet._read_image, private but the function detect() calls) gives the
    # network blob; a file goes through cv2.imread (BGR). Our RGB->BGR flip must give the identical blob.
    from nudenet.nudenet import _read_image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    image[..., 0] = 250  # a red cast, so a channel swap changes the blob
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    from_file = _read_image(str(path), 320)[0]
    assert np.array_equal(_read_image(to_nudenet_input(image), 320)[0], from_file)
    assert not np.array_equal(_read_image(image, 320)[0], from_file)  # the unflipped RGB array would differ
    assert detector.detector.detect(str(path)) == detector.detector.detect(to_nudenet_input(image))


def test_missing_nudenet_is_a_one_line_import_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nudenet", None)  # what `import nudenet` sees when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'erase\[nudity\]'") as info:
        NudityDetector()
    assert "\n" not in str(info.value)
