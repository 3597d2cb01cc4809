"""Reading images in every mode, DICOM, corrupt files, and finding datasets in each layout."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest
from _images import encode, make_class_tree, xray_like
from PIL import Image

from covid_xray.data import discover, resolve_data_dir
from covid_xray.images import decode_samples, load_image
from covid_xray.errors import DataError, ImageError

BASE = xray_like(128)
REFERENCE = load_image(encode(BASE, "PNG"), 64)


@pytest.mark.parametrize(
    "mode", ["L", "LA", "RGB", "RGBA", "P", "CMYK"],
)
def test_every_8bit_mode_gives_the_same_grayscale(mode):
    img = BASE.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode in ("LA",) else "PNG")
    out = load_image(encode(img, fmt), 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    tolerance = 6 if fmt == "JPEG" or mode == "P" else 1.5
    assert np.abs(out.astype(float) - REFERENCE).mean() < tolerance


def test_16bit_png_uses_the_full_range():
    arr = (np.asarray(BASE, dtype=np.uint16) * 16 + 1000)  # 12-bit data in a 16-bit container
    img = Image.fromarray(arr.astype("<u2"))
    assert img.mode == "I;16"
    out = load_image(encode(img, "PNG"))
    assert out.min() == 0 and out.max() == 255  # not clipped to white, not crushed to black
    assert np.corrcoef(out.ravel(), np.asarray(BASE).ravel())[0, 1] > 0.99


def test_exif_rotation_is_applied():
    img = Image.new("L", (80, 40), 0)
    img.paste(255, (0, 0, 40, 40))  # bright left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = load_image(encode(img, "JPEG", exif=exif))
    assert out.shape == (80, 40)  # height and width swapped
    assert out[:40].mean() > 200 and out[40:].mean() < 50  # bright part now on top


def _dicom(pixels: np.ndarray, photometric="MONOCHROME2", slope=1.0, intercept=0.0, window=None) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_monochrome2_and_inverted_monochrome1():
    pixels = np.asarray(BASE, dtype=np.uint16) * 16
    normal = load_image(_dicom(pixels), 64)
    inverted = load_image(_dicom(pixels, "MONOCHROME1"), 64)
    assert np.corrcoef(normal.ravel(), REFERENCE.ravel())[0, 1] > 0.99
    assert np.abs(inverted.astype(int) + normal.astype(int) - 255).max() <= 1


def test_dicom_voi_window_is_applied():
    pixels = np.tile(np.arange(0, 4000, 4000 / 64), (64, 1))  # horizontal ramp 0..4000
    out = load_image(_dicom(pixels, window=(1000, 400)))  # window covers only 800..1200
    column = out[0]
    assert column[:12].max() == 0 and column[20:].min() == 255  # outside the window: clipped
    assert 0 < column[13] < 255


def test_dicom_file_path_with_dcm_suffix(tmp_path):
    path = tmp_path / "film.dcm"
    path.write_bytes(_dicom(np.asarray(BASE, dtype=np.uint16) * 16))
    assert load_image(path, 32).shape == (32, 32)


def test_large_jpeg_is_draft_decoded_close_to_full_decode():
    big = xray_like(3000, mode="RGB")
    data = encode(big, "JPEG", quality=90)
    fast = load_image(data, 224).astype(float)
    full = np.asarray(big.convert("L").resize((224, 224), Image.Resampling.BILINEAR), dtype=float)
    assert np.abs(fast - full).mean() < 3


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"hello, this is not an image", "not an image"),
        (encode(xray_like(64), "JPEG")[:300], "corrupt image"),
        (encode(xray_like(64), "PNG")[:100], "corrupt image"),
    ],
)
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError) as err:
        load_image(path, 64)
    message = str(err.value)
    assert str(path) in message and reason in message and "\n" not in message


def test_decompression_bomb_is_refused_without_decoding():
    # A tiny PNG whose header claims 20000×20000 pixels.
    header = encode(Image.new("L", (1, 1)), "PNG")
    import struct
    import zlib

    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    bomb = header[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + header[33:]
    with pytest.raises(ImageError, match="refusing to decode"):
        load_image(bomb, 64)


# --- dataset discovery --------------------------------------------------------------------------


def test_kaggle_layout(tmp_path):
    make_class_tree(tmp_path / "train", per_class=10)
    make_class_tree(tmp_path / "test", per_class=3)
    ds = discover(tmp_path, val_fraction=0.2)
    assert ds.layout == "kaggle" and ds.classes == ["A", "B", "C"] and ds.carved == ["val"]
    assert len(ds["test"]) == 9 and len(ds["val"]) == 6 and len(ds["train"]) == 24
    assert sorted(s.label for s in ds["val"]) == [0, 0, 1, 1, 2, 2]  # stratified


def test_class_folders_carve_a_recorded_seeded_test_split(tmp_path):
    make_class_tree(tmp_path / "data", per_class=10)
    a = discover(tmp_path / "data", split_seed=1)
    b = discover(tmp_path / "data", split_seed=1)
    assert a.layout == "folders" and a.carved == ["test", "val"]
    assert [s.path for s in a["test"]] == [s.path for s in b["test"]]
    assert not {s.path for s in a["test"]} & {s.path for s in a["train"] + a["val"]}
    a.write_splits_csv(tmp_path / "splits.csv")
    rows = list(csv.DictReader(open(tmp_path / "splits.csv")))
    assert len(rows) == 30 and {r["split"] for r in rows} == {"train", "val", "test"}


def test_csv_manifest_with_and_without_split(tmp_path):
    make_class_tree(tmp_path / "imgs", per_class=10)
    files = sorted((tmp_path / "imgs").rglob("*.png"))
    with open(tmp_path / "m.csv", "w") as f:
        f.write("path,label,split\n")
        for i, p in enumerate(files):
            f.write(f"{p.relative_to(tmp_path)},{p.parent.name},{'test' if i % 5 == 0 else 'train'}\n")
    ds = discover(tmp_path / "m.csv")
    assert ds.layout == "csv" and ds.carved == ["val"] and len(ds["test"]) == 6


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda r: (make_class_tree(r, classes=("A",), per_class=4)), "only one class"),
        (lambda r: (make_class_tree(r, per_class=4), (r / "D").mkdir()), "has no images"),
        (lambda r: (make_class_tree(r / "train", per_class=4), make_class_tree(r / "test", classes=("A", "B"), per_class=2)), "class sets differ"),
        (lambda r: (r / "notes.txt").write_text("no folders here"), "no class folders"),
    ],
)
def test_layout_errors_are_clear(tmp_path, build, message):
    build(tmp_path)
    with pytest.raises(DataError, match=message):
        discover(tmp_path)


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("COVID_XRAY_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="pranavraikokte/covid19-image-dataset"):
        resolve_data_dir(None)
    monkeypatch.setenv("COVID_XRAY_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path


def test_bad_image_stops_or_is_skipped_and_counted(tmp_path):
    make_class_tree(tmp_path, per_class=8)
    (tmp_path / "B" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    samples = discover(tmp_path, val_fraction=0.25, test_fraction=0.25)
    everything = samples["train"] + samples["val"] + samples["test"]
    with pytest.raises(ImageError, match=r"broken\.jpg.*--skip-bad-images"):
        decode_samples(everything, 32)
    decoded = decode_samples(everything, 32, skip_bad=True)
    assert len(decoded.samples) == len(everything) - 1 and len(decoded.bad) == 1
    assert decoded.images[:].shape == (len(everything) - 1, 32, 32)


def test_decoded_images_are_cached_on_disk_by_content(tmp_path):
    make_class_tree(tmp_path / "d", per_class=8)
    samples = discover(tmp_path / "d")["train"]
    first = decode_samples(samples, 40, cache_dir=tmp_path / "cache")
    files = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == len(samples) and all(f.parent.parent.name == "size40-v1" for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = decode_samples(samples, 40, cache_dir=tmp_path / "cache")  # reused, not re-decoded
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert np.array_equal(first.images[:], second.images[:])
    assert np.array_equal(first.images[0], load_image(samples[0].path, 40))


def test_texture_jitter_blurs_and_compresses_but_keeps_the_film():
    import torch

    from covid_xray.data import TextureJitter

    torch.manual_seed(0)
    film = torch.from_numpy(np.asarray(xray_like(128, seed=3).convert("L")).copy())[None]
    assert torch.equal(TextureJitter(p=0.0)(film), film)
    out = TextureJitter(p=1.0, low=0.4)(film)
    assert out.shape == film.shape and out.dtype == torch.uint8
    def detail(x):  # fine detail: mean difference between neighbouring pixels
        return x.float().diff(dim=-1).abs().mean()

    assert detail(out) < 0.8 * detail(film)  # resolution lost
    assert (out.float() - film.float()).abs().mean() < 12  # but the same film


def test_files_known_to_be_mislabelled_are_listed_and_can_be_left_out(tmp_path, monkeypatch):
    import hashlib

    from covid_xray import known_labels
    from covid_xray.audit import audit_dataset

    root = make_class_tree(tmp_path / "data", per_class=8, size=64)
    wrong = sorted((root / "A").iterdir())[0]
    data = wrong.read_bytes()
    # This generated file plays the part of a known bad label (the real list holds the Kaggle SARS figures).
    monkeypatch.setitem(known_labels.MISLABELLED, hashlib.sha256(data).hexdigest(), "not what its folder says")
    monkeypatch.setattr(known_labels, "BYTE_SIZES", known_labels.BYTE_SIZES | {len(data)})
    copy = tmp_path / "data" / "B" / "renamed.png"
    copy.write_bytes(data)  # the same bytes under another name and class are recognised too

    kept = discover(root)
    report = audit_dataset(kept, probe=False)
    assert sorted(f.path for f, _ in report.known_mislabelled) == sorted([wrong, copy])
    assert "Labels known to be wrong" in report.to_markdown()
    dropped = discover(root, drop_mislabelled=True)
    assert sorted(dropped.dropped) == sorted([wrong, copy])
    every = [s.path for split in dropped.splits.values() for s in split]
    assert wrong not in every and copy not in every and len(every) == len(
        [s for split in kept.splits.values() for s in split]) - 2


@pytest.mark.skipif(not os.environ.get("COVID_XRAY_DATA"), reason="COVID_XRAY_DATA is not set")
def test_the_kaggle_sars_figures_are_recognised():
    dataset = discover(os.environ["COVID_XRAY_DATA"], drop_mislabelled=True)
    assert sorted(p.name for p in dataset.dropped) == sorted(
        f"0{n}.jpeg" if n != 56 else "056.jpg" for n in range(40, 60))
    assert all(p.parent.name == "Covid" and p.parent.parent.name == "train" for p in dataset.dropped)
