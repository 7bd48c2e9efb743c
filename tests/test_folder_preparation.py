"""Preparing a folder dataset (folder:PATH) as it is used: folders that change after their
preparation, runs that prepare at the same time or were killed while preparing, and images
that are unusual (16-bit, huge, other formats, symbolic link loops).

Each test prepares a few tiny images; the concurrent and memory tests run the preparation in
real subprocesses, as two runs or `python -m lbsgd.datasets` would.
"""

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lbsgd.datasets import image_folder, load_dataset
from lbsgd.datasets.__main__ import prepare
from lbsgd.errors import DataError
from tests.helpers import REPO, folder_config, write_image_folder


def _folder(tmp_path: Path) -> Path:
    """3 classes of 2 train / 1 val real 80x60 JPEGs."""
    return write_image_folder(tmp_path / "photos", train_per_class=2, val_per_class=1)


def _load(root: Path, data_dir: Path, *, skip_corrupt: bool = False):
    return image_folder.load(str(root), data_dir=str(data_dir), skip_corrupt=skip_corrupt,
                             threads=1, multi_process=False)


def _python(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# 1. A folder that changed after its preparation is prepared again.


def test_a_folder_changed_after_preparation_is_prepared_again(tmp_path, caplog):
    root, data_dir = _folder(tmp_path), tmp_path / "tfds"
    first = _load(root, data_dir)
    with caplog.at_level(logging.INFO):
        assert _load(root, data_dir).data_dir == first.data_dir  # unchanged: reused
    assert "prepare" not in caplog.text.lower()

    # A new class, and an image replaced by another one.
    for split in ("train", "val"):
        (root / split / "class_3").mkdir()
        shutil.copy(root / split / "class_0" / "000.jpg", root / split / "class_3")
    replaced = root / "train" / "class_0" / "001.jpg"
    Image.open(replaced).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(replaced, quality=50)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        dataset = load_dataset(folder_config(root, data_dir, num_classes=4))
    assert dataset.num_classes == 4 and (len(dataset.train), len(dataset.eval)) == (7, 4)
    record = dataset.train.records[1]
    assert record["file_name"] == b"train/class_0/001.jpg"
    assert record["image"] == replaced.read_bytes()  # the new file, not the old one
    assert f"folder dataset {root} changed since it was prepared" in caplog.text
    assert "prepared again" in caplog.text


def test_a_multi_process_run_on_a_changed_folder_asks_to_prepare_it_again(tmp_path):
    root, data_dir = _folder(tmp_path), tmp_path / "tfds"
    _load(root, data_dir)
    (root / "val" / "class_2" / "000.jpg").unlink()
    (root / "train" / "class_2" / "000.jpg").rename(root / "val" / "class_2" / "000.jpg")
    with pytest.raises(DataError, match=f"folder:{root} changed since it was prepared .*: "
                       "prepare it again before a multi-process run with\n    python -m "
                       f"lbsgd.datasets folder:{root} --data_dir={data_dir}"):
        image_folder.load(str(root), data_dir=str(data_dir), skip_corrupt=False, threads=1,
                          multi_process=True)


# 2. Two runs preparing the same folder at once: one prepares, the other waits for it.

CONCURRENT = """
import sys, time
from pathlib import Path
from absl import logging
from lbsgd.datasets.__main__ import prepare
logging.set_verbosity(logging.INFO)
folder, data_dir, ready, go = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():  # both processes start preparing within milliseconds
    time.sleep(0.002)
print(prepare("folder:" + folder, data_dir=data_dir, skip_corrupt_images=False, threads=1))
"""


def test_two_processes_preparing_one_folder_at_once_both_get_it_prepared_once(tmp_path):
    root = write_image_folder(tmp_path / "photos", train_per_class=6, val_per_class=2)
    data_dir, go = tmp_path / "tfds", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    processes = [_python(CONCURRENT, root, data_dir, r, go) for r in ready]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    (out0, err0), (out1, err1) = [p.communicate(timeout=240) for p in processes]
    for process, err in zip(processes, (err0, err1), strict=True):
        assert process.returncode == 0, err[-3000:]
    assert out0.splitlines()[-1] == out1.splitlines()[-1]  # the same prepared directory
    assert (err0 + err1).count("Converting") == 1  # prepared once; the other waited, then read it
    assert not list(data_dir.rglob("incomplete.*"))
    assert len(_load(root, data_dir).as_data_source("train")) == 18


# 3. A killed preparation's temporary directory is removed by the next preparation.


def test_a_killed_preparation_leaves_nothing_behind_after_the_next_one(tmp_path):
    root, data_dir = _folder(tmp_path), tmp_path / "tfds"
    prepared = Path(prepare(f"folder:{root}", data_dir=str(data_dir),
                            skip_corrupt_images=False, threads=1))
    # What a preparation killed mid-way leaves: TFDS's temporary directory, never renamed.
    stale = prepared.parent / f"incomplete.KILLED_{prepared.name}"
    prepared.rename(stale)
    assert prepare(f"folder:{root}", data_dir=str(data_dir), skip_corrupt_images=False,
                   threads=1) == str(prepared)
    assert not stale.exists() and not list(data_dir.rglob("incomplete.*"))
    assert len(_load(root, data_dir).as_data_source("val")) == 3


# 4. Unusual images: 16-bit PNGs, huge images, other formats and symbolic link loops.


def test_16_bit_grayscale_pngs_are_scaled_to_8_bits_not_clipped_white(tmp_path):
    root = _folder(tmp_path)
    levels = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 256  # 0..255
    png = root / "train" / "class_1" / "deep.png"
    Image.fromarray(levels * 257).save(png)  # the 16-bit values of levels: 0..65535
    assert Image.open(png).mode == "I;16"
    config = folder_config(root, tmp_path / "tfds", image_size=32, augment="none")
    dataset = load_dataset(config)
    names = [r["file_name"] for r in dataset.train.records.__getitems__(range(7))]
    pixels = dataset.train.read(np.array([names.index(b"train/class_1/deep.png")]))["image"][0]
    for channel in range(3):  # training reads the same 8-bit levels, gray in RGB
        np.testing.assert_array_equal(pixels[..., channel], levels)


# The peak memory a preparation adds, in MB: Linux's peak resident size (VmHWM), reset to the
# current size (clear_refs 5) once everything is imported.
PEAK_MEMORY = """
import re, sys
from lbsgd.datasets.__main__ import prepare
def kb(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = kb("VmRSS")
prepare("folder:" + sys.argv[1], data_dir=sys.argv[2], skip_corrupt_images=False, threads=1)
print((kb("VmHWM") - before) // 1024)
"""


def test_a_huge_png_is_prepared_in_bounded_memory(tmp_path):
    """A 6000 x 6000 single-colour PNG (a few KB on disk, 36 megapixels): preparing it costs
    about its decoded pixels (144 MB, 4 bytes each), not float64 copies of them (2 GB)."""
    root = _folder(tmp_path)
    Image.new("RGB", (6000, 6000), (200, 100, 50)).save(root / "train" / "class_2" / "big.png")
    process = _python(PEAK_MEMORY, root, tmp_path / "tfds")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    added_mb = int(out.split()[-1])
    assert added_mb < 250, f"preparing one 36-megapixel PNG added {added_mb} MB at its peak"
    metadata = _load(root, tmp_path / "tfds").info.metadata
    np.testing.assert_allclose(metadata["mean"], [200, 100, 50], atol=1.0)  # the big image


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_images_above_the_pixel_limit_are_reported_from_their_header(tmp_path, monkeypatch,
                                                                      caplog):
    root = _folder(tmp_path)
    Image.new("RGB", (6000, 6000), (200, 100, 50)).save(root / "train" / "class_2" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000 * 6000 - 1)  # Pillow's limit
    with pytest.raises(DataError, match=r"1 image\(s\) cannot be decoded:\n    "
                       r"train/class_2/big.png: 6000x6000 = 36,000,000 pixels, above the "
                       r"limit of 35,999,999 \(PIL.Image.MAX_IMAGE_PIXELS\)"):
        _load(root, tmp_path / "tfds")
    with caplog.at_level(logging.WARNING):
        builder = _load(root, tmp_path / "tfds", skip_corrupt=True)
    assert len(builder.as_data_source("train")) == 6
    assert "1 corrupt image(s) skipped (not in the dataset): train/class_2/big.png" in caplog.text


def test_gifs_and_symbolic_link_loops_are_counted_as_skipped(tmp_path, caplog):
    root = _folder(tmp_path)
    Image.open(root / "train" / "class_0" / "000.jpg").save(root / "train" / "class_0" / "a.gif")
    os.symlink("loop.jpg", root / "train" / "class_1" / "loop.jpg")  # points at itself
    with caplog.at_level(logging.WARNING):
        builder = _load(root, tmp_path / "tfds")
    assert len(builder.as_data_source("train")) == 6
    assert builder.info.metadata["skipped_files"] == [
        ["train/class_0/a.gif", "not a .jpg, .jpeg or .png file"],
        ["train/class_1/loop.jpg", "a symbolic link loop"]]
    assert (f"folder dataset {root}: 2 file(s) skipped (not in the dataset): "
            "train/class_0/a.gif (not a .jpg, .jpeg or .png file), train/class_1/loop.jpg (a "
            "symbolic link loop)") in caplog.text
