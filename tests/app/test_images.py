"""How hookmix reads image files: 16-bit pixels scaled, not clipped; images over PIL's decompression-bomb limit
and other unreadable files found up front from their headers and reported in one line.

Plausible maintainer bugs, and the test that catches each:

* reading with a bare ``convert("RGB")`` again (16-bit values clip to 255: a ~white image), in training
  (``test_sixteen_bit_pixels_are_scaled_to_eight_bit``) or in predict
  (``test_predict_reads_a_sixteen_bit_png_as_its_eight_bit_copy``);
* scaling by 256, or by 65535 / 255 with floor, instead of round(v / 257)
  -> ``test_sixteen_bit_pixels_are_scaled_to_eight_bit`` (exact per-pixel values);
* taking 32-bit ``I`` values outside 0..65535, or float ``F`` images, as 16-bit
  -> ``test_pixels_of_unknown_range_are_refused``;
* dropping ``DecompressionBombError`` from the caught errors (it is not an ``OSError``) -> a traceback in
  ``test_finetune_refuses_unreadable_images_up_front_in_one_line``,
  ``test_predict_skips_a_decompression_bomb_with_a_message`` and
  ``test_an_over_limit_image_in_a_labels_csv_is_skipped``;
* checking the images lazily again (at extraction) instead of up front, or with a check that decodes every
  image (slow) -> ``test_the_folder_check_runs_before_any_image_is_decoded``.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from hookmix.app.cli import main
from hookmix.app.imagefolder import load_image_folder
from hookmix.app.labels_csv import load_labels_csv
from hookmix.headonly.images import UnreadableImage, image_problem, read_rgb
from tests.conftest import write_folder

GRADIENT = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
"""Every 16th 16-bit value, 0 to 65520, as a 64x64 grey image."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A PNG whose header says ``side`` x ``side`` 8-bit grey pixels (400 M for 20,000: over PIL's limit of
    2 x 89.5 M), with a few bytes of data: what a decompression bomb looks like to ``Image.open``."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)
    return path


def expected_eight_bit(values: np.ndarray) -> np.ndarray:
    """The 8-bit grey value of each 16-bit value: the nearest of 0, 257, 514, ..., 65535 (k * 257 -> k)."""
    return np.abs(values.astype(np.int64)[..., None] - 257 * np.arange(256)).argmin(axis=-1)


@pytest.mark.parametrize("kind", ["I;16 png", "I;16B tiff", "I tiff"])
def test_sixteen_bit_pixels_are_scaled_to_eight_bit(kind: str, tmp_path: Path) -> None:
    """PIL reads 16-bit PNGs as I;16, big-endian TIFFs as I;16B and 32-bit integer TIFFs as I; each becomes grey
    RGB with v -> round(v / 257), checked per pixel against a table built by search (not by the formula)."""
    if kind == "I;16 png":
        image, path = Image.fromarray(GRADIENT), tmp_path / "g.png"
    elif kind == "I;16B tiff":
        image, path = Image.frombytes("I;16B", (64, 64), GRADIENT.astype(">u2").tobytes()), tmp_path / "g.tif"
    else:
        image, path = Image.fromarray(GRADIENT.astype(np.int32)), tmp_path / "g.tif"
    image.save(path)
    assert Image.open(path).mode == kind.split()[0]
    rgb = np.asarray(read_rgb(path))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert (rgb == rgb[..., :1]).all()  # grey
    np.testing.assert_array_equal(rgb[..., 0], expected_eight_bit(GRADIENT))
    assert abs(rgb.mean() - 127.5) < 0.1  # convert("RGB") alone gives 254.5: 99.6% of the pixels white


def test_pixels_of_unknown_range_are_refused(tmp_path: Path) -> None:
    """32-bit integer pixels beyond 65535 (only decoding shows them) and float pixels (the header shows them)
    have no known 8-bit scale: a reason, not a guess."""
    wide = tmp_path / "wide.tif"
    Image.fromarray(GRADIENT.astype(np.int32) * 2).save(wide)
    with pytest.raises(UnreadableImage, match=r"32-bit integer pixels from 0 to 131040, outside .*0\.\.65535"):
        read_rgb(wide)
    floats = tmp_path / "f.tif"
    Image.fromarray(GRADIENT.astype(np.float32) / 65535).save(floats)
    assert "32-bit float pixels (mode F) have no known range" in image_problem(floats)
    with pytest.raises(UnreadableImage, match="mode F"):
        read_rgb(floats)


def test_image_problem_reads_headers(tmp_path: Path) -> None:
    """A good file has no problem; a text file, an over-limit header and a truncated PNG each have one
    reason (the truncation only with ``verify``, which reads the file through)."""
    good = write_folder(tmp_path / "f", per_class=1) / "cat" / "0.png"
    assert image_problem(good) is None and image_problem(good, verify=True) is None
    (tmp_path / "text.png").write_text("not an image")
    assert image_problem(tmp_path / "text.png") == "not an image format PIL reads"
    bomb = image_problem(bomb_png(tmp_path / "bomb.png"))
    assert "400000000 pixels" in bomb and "MAX_IMAGE_PIXELS" in bomb and "\n" not in bomb
    cut = tmp_path / "cut.png"
    Image.fromarray(GRADIENT).save(cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert image_problem(cut) is None and image_problem(cut, verify=True) is not None
    with pytest.raises(UnreadableImage, match="truncated"):
        read_rgb(cut)


def cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``hookmix`` prints for a usage error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


def test_finetune_refuses_unreadable_images_up_front_in_one_line(tmp_path: Path, capsys) -> None:
    """Two bad files among twelve: a decompression bomb and a text file, both named, relative to --data."""
    data = write_folder(tmp_path / "imgs", per_class=4, size=32)
    bomb_png(data / "dog" / "big.png")
    (data / "eel" / "notes.png").write_text("not an image")
    args = ["finetune", "--data", str(data), "--model", "resnet18", "--input-size", "3", "32", "32", "--quiet"]
    line = cli_error([*args, "--out", str(tmp_path / "run")], capsys)
    assert line.startswith(f"hookmix: error: --data {data} has 2 unreadable image(s) of 14: dog/big.png (Image size ")
    assert "eel/notes.png (not an image format PIL reads)" in line and "Remove or replace them" in line
    assert not (tmp_path / "run" / "run.json").exists()


def test_the_folder_check_runs_before_any_image_is_decoded(tmp_path: Path, monkeypatch) -> None:
    """The check reads headers only (no ``ImageFile.load``) and happens in ``load_image_folder``, before any
    dataset item is read; the same folder without the bad file loads."""
    data = write_folder(tmp_path / "imgs", per_class=3, size=16)
    bomb_png(data / "cat" / "big.png")
    decoded: list[str] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.mode) or real_load(self))
    with pytest.raises(
        ValueError, match=r"1 unreadable image\(s\) of 10: cat/big\.png \(Image size \(400000000 pixels\)"
    ):
        load_image_folder(data, (3, 16, 16))
    assert decoded == []
    (data / "cat" / "big.png").unlink()
    split = load_image_folder(data, (3, 16, 16))
    assert len(split.train) + len(split.val) == 9 and decoded == []
    assert split.train[0][0].shape == (3, 16, 16) and decoded


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    data = write_folder(tmp / "imgs", per_class=3, size=32)
    common = ["--model", "resnet18", "--input-size", "3", "32", "32", "--epochs", "1", "--head", "linear", "--quiet"]
    assert main(["finetune", "--data", str(data), *common, "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def test_predict_reads_a_sixteen_bit_png_as_its_eight_bit_copy(resnet_run: Path, tmp_path: Path) -> None:
    """The 16-bit gradient and the 8-bit image of round(v / 257) get the same probabilities (on main the
    16-bit one was read as a near-white image)."""
    Image.fromarray(GRADIENT).save(tmp_path / "a16.png")
    Image.fromarray(expected_eight_bit(GRADIENT).astype(np.uint8), "L").save(tmp_path / "b8.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "c_white.png")
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(resnet_run), str(tmp_path), "--out", str(out), "--top-k", "3", "--quiet"]) == 0
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert [Path(row[0]).name for row in rows] == ["a16.png", "b8.png", "c_white.png"]
    assert rows[0][1:] == rows[1][1:]
    assert rows[0][1:] != rows[2][1:]


def test_predict_skips_a_decompression_bomb_with_a_message(resnet_run: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(GRADIENT).save(images / "a.png")
    bomb_png(images / "b_bomb.png")
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(resnet_run), str(images), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hookmix: skipped {images / 'b_bomb.png'}: not a readable image (Image")
    assert "MAX_IMAGE_PIXELS" in err[0]
    assert [Path(line.split(",")[0]).name for line in out.read_text().splitlines()[1:]] == ["a.png"]


def test_an_over_limit_image_in_a_labels_csv_is_skipped(tmp_path: Path) -> None:
    """The labels CSV keeps its rule (unreadable rows are skipped and listed); a bomb is one of them."""
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(GRADIENT).save(tmp_path / name)
    bomb_png(tmp_path / "big.png")
    csv = tmp_path / "l.csv"
    csv.write_text("path,labels\na.png,x\nbig.png,y\nb.png,y\nc.png,x;y\n")
    data = load_labels_csv(csv, tmp_path, (3, 16, 16), val_fraction=0.3)
    assert len(data.skipped) == 1 and data.skipped[0].startswith(f"--labels {csv} line 3: {tmp_path / 'big.png'} (")
    assert sorted(map(Path, data.train.paths + data.val.paths)) == [tmp_path / n for n in ("a.png", "b.png", "c.png")]
