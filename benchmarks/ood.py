"""How the out-of-distribution guard of a trained bundle does on images it must and must not flag.

    python benchmarks/ood.py RUN/model [--data DIR]

Must flag: scikit-image's sample photos, documents, noise, solid colours, patterns, and medical
images of other body parts and modalities (NEMA WG04 / pydicom test DICOMs: tibia radiograph,
shoulder and head MR, CT, ultrasound, nuclear medicine). Must pass: the dataset's test X-rays, a
chest radiograph from another scanner and hospital (NEMA WG04 `RG1`, computed radiography), and
the test X-rays under simulated acquisition changes (exposure, contrast, crop, rotation, blur,
heavy JPEG compression). Needs the test extra (scikit-image, pydicom-data).
"""

from __future__ import annotations

import argparse
import io
import os

import numpy as np
from PIL import Image, ImageFilter

from covid_xray.evaluation import trained_dataset
from covid_xray.images import decode_samples, load_image
from covid_xray.inference import Predictor
from covid_xray.ood import synthetic_outliers

PHOTOS = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
          "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "rocket")
DOCUMENTS = ("page", "text")
OTHER_MEDICAL = ("RG3_UNCI.dcm", "MR2_UNCI.dcm", "CT_small.dcm", "MR_small.dcm", "US1_UNCI.dcm",
                 "JPEG2000_UNC.dcm", "emri_small.dcm", "693_UNCI.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm")
OTHER_CHEST = ("RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def skimage_images(names, size: int) -> np.ndarray:
    from skimage import data

    return np.stack([load_image(_png(np.asarray(getattr(data, name)())), size) for name in names])


def dicom_images(names, size: int) -> np.ndarray:
    from pydicom.data import get_testdata_file

    return np.stack([load_image(get_testdata_file(name), size) for name in names])


def acquisition_changes(images: np.ndarray) -> np.ndarray:
    """The same films as another scanner or export pipeline might produce them."""
    out = []
    for image in images:
        x = image.astype(np.float32) / 255
        pil = Image.fromarray(image)
        size = image.shape[0]
        margin = size // 12
        jpeg = io.BytesIO()
        pil.save(jpeg, format="JPEG", quality=20)
        out += [
            np.clip(255 * x**0.6, 0, 255), np.clip(255 * x**1.6, 0, 255),  # exposure / LUT
            np.clip(255 * (0.6 * x + 0.2), 0, 255),  # flat contrast
            np.asarray(pil.crop((margin, margin, size - margin, size - margin)).resize((size, size))),  # tighter field
            np.asarray(pil.rotate(7, resample=Image.BILINEAR)),  # patient not straight
            np.asarray(pil.filter(ImageFilter.GaussianBlur(2))),  # softer detector
            np.asarray(Image.open(jpeg)),
        ]
    return np.stack(out).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--data", default=os.environ.get("COVID_XRAY_DATA"))
    args = parser.parse_args()

    predictor = Predictor.from_bundle(args.bundle)
    size = predictor.size
    test = decode_samples(trained_dataset(predictor.config, args.data)["test"], size).images[:]
    groups = {
        "must pass": {
            "dataset test X-rays": test,
            "chest CR film, another scanner (WG04 RG1, 4 encodings)": dicom_images(OTHER_CHEST, size),
            "test X-rays, simulated acquisition changes (7 each)": acquisition_changes(test),
        },
        "must flag": {
            "photos (scikit-image samples)": skimage_images(PHOTOS, size),
            "documents": np.concatenate([skimage_images(DOCUMENTS, size), synthetic_outliers(size, seed=1)["document"]]),
            "other body parts and modalities (DICOM)": dicom_images(OTHER_MEDICAL, size),
            **{kind: images for kind, images in synthetic_outliers(size, seed=1).items() if kind != "document"},
        },
    }
    print(f"bundle {args.bundle}: OOD threshold {predictor.guard.threshold:.4f}\n")
    print("| group | images | flagged | score median (min–max) |")
    print("| --- | ---: | ---: | --- |")
    for verdict, kinds in groups.items():
        for kind, images in kinds.items():
            scores = np.array([s.ood_score for s in predictor.score(images)])
            flagged = predictor.guard.flags(scores)
            print(f"| {verdict}: {kind} | {len(images)} | {flagged.mean():.1%} | "
                  f"{np.median(scores):.3f} ({scores.min():.3f}–{scores.max():.3f}) |")


if __name__ == "__main__":
    main()
