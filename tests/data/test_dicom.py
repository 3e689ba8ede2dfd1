"""DICOM ultrasound on real scanner files (pydicom's test files and the pydicom-data package:
US1 RGB / JPEG 2000, ALOKA 16-bit palette, OBXXXX1A palette cine, a 120-frame JPEG baseline
YBR_FULL_422 cine, JPEG lossless MONOCHROME2) plus small files written here for the depths and
photometric interpretations no real file covers.  Nothing is downloaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from echomoe.data.formats import CorruptImageError, MissingImageError
from echomoe.data.formats.dicom import load_dicom, read_dicom
from echomoe.data.formats.errors import read_image, verify_image
from echomoe.data.pixels import is_dicom, to_uint8
from echomoe.data.schema import UltrasoundSample


def _real(name: str) -> Path:
    """A file shipped by pydicom (test_files) or the pydicom-data package (a dev dependency);
    looked up on disk only (pydicom's get_testdata_file may download)."""
    import data_store

    for folder in (Path(pydicom.__file__).parent / "data" / "test_files",
                   Path(data_store.__file__).parent / "data"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name} is in neither pydicom's test files nor pydicom-data")


def _gray_fraction(rgb: np.ndarray, tol: int = 2) -> float:
    a = rgb.astype(int)
    return float(np.mean((abs(a[..., 0] - a[..., 1]) <= tol) & (abs(a[..., 1] - a[..., 2]) <= tol)))


def _write(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
           bits_stored: int = 16, signed: bool = False) -> Path:
    """A minimal uncompressed single-frame ultrasound DICOM file."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- real files
def test_rgb_and_jpeg2000_decode_to_the_same_frame():
    raw = read_dicom(_real("US1_UNCR.dcm"), grayscale=False)
    lossless = read_dicom(_real("US1_J2KR.dcm"), grayscale=False)  # YBR_RCT
    lossy = read_dicom(_real("US1_J2KI.dcm"), grayscale=False)  # YBR_ICT
    assert raw.frames[0].shape == (480, 640, 3) and raw.frames[0].dtype == np.uint8
    assert raw.photometric == "RGB" and lossless.photometric == "YBR_RCT"
    np.testing.assert_array_equal(lossless.frames[0], raw.frames[0])
    assert np.abs(lossy.frames[0].astype(int) - raw.frames[0]).mean() < 3
    assert raw.pixel_spacing_mm is None and raw.regions == []  # US1 has no region sequence


def test_grayscale_keeps_b_mode_intensities():
    path = _real("gdcm-US-ALOKA-16.dcm")
    rgb = read_dicom(path, grayscale=False).frames[0]
    gray = read_dicom(path).frames[0]
    assert gray.shape == (480, 640) and gray.dtype == np.uint8
    is_gray = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    assert is_gray.mean() > 0.8  # B-mode, with a colour bar and annotations
    np.testing.assert_array_equal(gray[is_gray], rgb[..., 0][is_gray])


def test_16_bit_palette_spacing_regions_and_crop():
    little = read_dicom(_real("gdcm-US-ALOKA-16.dcm"), grayscale=False)
    big = read_dicom(_real("gdcm-US-ALOKA-16_big.dcm"), grayscale=False)
    np.testing.assert_array_equal(little.frames[0], big.frames[0])
    assert little.photometric == "PALETTE COLOR" and little.bits_stored == 16
    # 16-bit palette entries rescaled (x 255 / 65535), not clipped: the frame is not saturated
    assert 200 < little.frames[0].max() <= 255 and np.mean(little.frames[0] == 255) < 0.01
    assert [r.bbox for r in little.regions] == [(32, 24, 335, 415), (336, 24, 639, 415),
                                                (32, 40, 63, 103)]
    assert little.pixel_spacing_mm == pytest.approx((0.38265, 0.38265), abs=1e-5)  # 0.0383 cm
    assert little.regions[2].spacing_mm is None  # a non-spatial region
    cropped = read_dicom(_real("gdcm-US-ALOKA-16.dcm"), crop_region=True)
    assert cropped.crop == (32, 24, 335, 415) and cropped.frames[0].shape == (392, 304)
    np.testing.assert_array_equal(cropped.frames[0], read_dicom(
        _real("gdcm-US-ALOKA-16.dcm")).frames[0][24:416, 32:336])


def test_palette_cine_frames_in_order_and_rle():
    raw = read_dicom(_real("OBXXXX1A_2frame.dcm"))
    rle = read_dicom(_real("OBXXXX1A_rle_2frame.dcm"))
    assert raw.num_frames == 2 and len(raw.frames) == 2 and raw.frames[0].shape == (600, 800)
    for a, b in zip(raw.frames, rle.frames, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(raw.frames[0], raw.frames[1])
    last = read_dicom(_real("OBXXXX1A_2frame.dcm"), frames=[-1])
    assert len(last.frames) == 1 and last.num_frames == 2
    np.testing.assert_array_equal(last.frames[0], raw.frames[1])
    assert raw.pixel_spacing_mm == pytest.approx((0.26229, 0.26229), abs=1e-5)
    with pytest.raises(IndexError, match="OBXXXX1A_2frame.dcm.* 2 frame"):
        read_dicom(_real("OBXXXX1A_2frame.dcm"), frames=[2])


def test_jpeg_baseline_ybr_422_cine_becomes_rgb():
    cine = read_dicom(_real("color3d_jpeg_baseline.dcm"), grayscale=False, frames=[0, 60])
    assert cine.num_frames == 120 and cine.photometric == "YBR_FULL_422"
    assert cine.frames[0].shape == (480, 640, 3)
    # converted to RGB: the B-mode is gray (left as YCbCr, Cb and Cr would sit near 128)
    assert all(_gray_fraction(f) > 0.9 for f in cine.frames)
    assert cine.pixel_spacing_mm == pytest.approx((0.5105, 0.5105), abs=1e-4)


def test_jpeg_lossless_monochrome_with_spacing():
    image = read_dicom(_real("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert image.photometric == "MONOCHROME2" and image.frames[0].shape == (768, 1024)
    assert image.frames[0].max() == 255 and image.frames[0].min() == 0
    assert image.pixel_spacing_mm == pytest.approx((0.25477, 0.25477), abs=1e-5)


# ----------------------------------------------------------------------------- depths
def test_12_bit_monochrome_is_rescaled_and_monochrome1_inverted(tmp_path):
    values = np.array([[0, 1024, 2048, 4095]], dtype=np.uint16)
    mono2 = read_dicom(_write(tmp_path / "m2.dcm", values, bits_stored=12)).frames[0]
    np.testing.assert_array_equal(mono2, [[0, 64, 128, 255]])
    mono1 = read_dicom(_write(tmp_path / "m1.dcm", values, photometric="MONOCHROME1",
                              bits_stored=12)).frames[0]
    np.testing.assert_array_equal(mono1, 255 - mono2)
    signed = np.array([[-2048, 0, 2047]], dtype=np.int16)
    np.testing.assert_array_equal(
        read_dicom(_write(tmp_path / "s.dcm", signed, bits_stored=12, signed=True)).frames[0],
        [[0, 128, 255]])


def test_to_uint8_rescales_every_depth():
    np.testing.assert_array_equal(to_uint8(np.array([0, 32768, 65535], np.uint16)),
                                  [0, 128, 255])
    np.testing.assert_array_equal(to_uint8(np.array([0, 4095], np.uint16), 12), [0, 255])
    np.testing.assert_array_equal(to_uint8(np.array([-1.0, 0.0, 1.0])), [0, 128, 255])
    np.testing.assert_array_equal(to_uint8(np.array([True, False])), [255, 0])
    u8 = np.array([3, 200], np.uint8)
    assert to_uint8(u8) is u8
    with pytest.raises(ValueError, match="bits must be"):
        to_uint8(np.zeros(2, np.uint16), 40)


def test_16_bit_png_is_rescaled_not_clipped(tmp_path):
    from PIL import Image

    ramp = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    np.testing.assert_array_equal(read_image(path), [[0, 1, 128, 255]])


# ----------------------------------------------------------------------------- paths and errors
def test_dicom_paths_work_wherever_images_are_read(tmp_path):
    src = _real("gdcm-US-ALOKA-16.dcm")
    renamed = tmp_path / "scan.img"  # DICOM is recognised by its preamble, not its extension
    shutil.copy(src, renamed)
    assert is_dicom(renamed) and not is_dicom(Path(__file__))
    assert verify_image(renamed) == (640, 480)
    expected = read_dicom(src).frames[0]
    np.testing.assert_array_equal(read_image(renamed), expected)
    np.testing.assert_array_equal(
        UltrasoundSample(id="a", images=[str(renamed)]).image_array(), expected)


def test_errors_name_the_file(tmp_path):
    png = tmp_path / "not_dicom.dcm"
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, format="PNG")
    with pytest.raises(CorruptImageError, match="not_dicom.dcm.*not a readable DICOM"):
        read_dicom(png)
    with pytest.raises(MissingImageError, match="nowhere.dcm"):
        read_dicom(tmp_path / "nowhere.dcm")
    header_only = tmp_path / "no_pixels.dcm"
    ds = pydicom.dcmread(_real("US1_UNCR.dcm"))
    del ds.PixelData
    ds.save_as(header_only)
    with pytest.raises(CorruptImageError, match="no_pixels.dcm.*no pixel data"):
        read_dicom(header_only)
    with pytest.raises(CorruptImageError, match="US1_UNCR.dcm.*no 2-D ultrasound region"):
        read_dicom(_real("US1_UNCR.dcm"), crop_region=True)


def test_load_dicom_folder_reports_what_it_skips(tmp_path):
    for name in ("gdcm-US-ALOKA-16.dcm", "OBXXXX1A_2frame.dcm"):
        (tmp_path / "study").mkdir(exist_ok=True)
        shutil.copy(_real(name), tmp_path / "study" / name)
    header_only = pydicom.dcmread(_real("US1_UNCR.dcm"))
    del header_only.PixelData
    header_only.save_as(tmp_path / "study" / "report.dcm")
    (tmp_path / "study" / "notes.txt").write_text("not an image")
    with pytest.raises(CorruptImageError, match="report.dcm"):
        load_dicom(tmp_path / "study", region="breast")
    result = load_dicom(tmp_path / "study", region="Breast", diagnosis="benign", strict=False)
    assert [s.id for s in result] == ["OBXXXX1A_2frame.dcm", "gdcm-US-ALOKA-16.dcm"]
    assert [len(s.images) for s in result] == [2, 1]
    assert {s.region for s in result} == {"breast"} and result[0].diagnosis == "benign"
    assert result[1].pixel_spacing == pytest.approx(0.38265, abs=1e-5)
    assert result[0].source == "dicom" and result[0].images[0].dtype == np.uint8
    assert [(s.record, s.error) for s in result.skipped] == [("report.dcm",
                                                             "CorruptImageError")]
    with pytest.raises(ValueError, match="unknown region"):
        load_dicom(tmp_path / "study", region="elbow")
