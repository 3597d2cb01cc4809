"""Files of public chest X-ray datasets whose label is known to be wrong, by SHA-256 of their bytes (so a
copy is recognised under any name, in any layout). The audit lists every one it finds in a dataset, and
the model card says so; `benchmarks/without_sars.py` writes a manifest without them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Kaggle "covid19-image-dataset" (pranavraikokte), filed as Covid: near-identical to SARS figures of a 2004
# RadioGraphics article (doi 10.1148/rg.242035193) in Cohen's COVID-19 image data collection. They show
# SARS, not COVID-19.
SARS_NOT_COVID = "a SARS figure from a 2004 article (doi 10.1148/rg.242035193), not a COVID-19 film"
MISLABELLED: dict[str, str] = {digest: SARS_NOT_COVID for digest in (
    "4106ff0736604e8721f9749ad40fd7287e2e4acfe52dcd8e97ad88267f09d6db",  # train/Covid/040.jpeg
    "8aa4bbfd3d5de41962b56508015fc22e3dedeeea5842a278101f5ef9590428fa",  # train/Covid/041.jpeg
    "f34e2fa4ebc56c72fe823520f826b4ce64b4aa03efc733974d96f0d4aaaff412",  # train/Covid/042.jpeg
    "5259503522bab4b781414565e9b92f1035cfcfd39d3c0a97af574e0c2b209e45",  # train/Covid/043.jpeg
    "d55ae10b356d1fa030dec1e6c8c22c2f113b234ce7f50434a0fa838e2e7e6b3f",  # train/Covid/044.jpeg
    "0fca2a440d28b67277b0f51afef9fe70d604a5c0cf3e24be4ee6c906c257929c",  # train/Covid/045.jpeg
    "a013a81b3a35028b2fe3a1c2f9c0d98817d9578eb0efa4c2cc005aed944b3364",  # train/Covid/046.jpeg
    "a20c9c4f20d2f43561d9aaf03c63c2cabe35bc986257fa8d2e389915b41232f3",  # train/Covid/047.jpeg
    "ef3173ca05db896166aa1ffe0de2394bea0dc36a7252a45b64b9f849b1b6d2fc",  # train/Covid/048.jpeg
    "ca6f0abef3304b8f8ba60504aaf91898c1fe503bd260173c872918cbeaffba67",  # train/Covid/049.jpeg
    "f146460b3b6b499f909c44b5e3116c05569b098b0e23801f4065419961ba407e",  # train/Covid/050.jpeg
    "42b4d3e4b7113a567da4338ed13836c5cbe35db73526d18f14615a90137338c8",  # train/Covid/051.jpeg
    "5fb52a23ed6c0141918150970f099e4cba24eb329b0df7fc49f2eabcc82374f4",  # train/Covid/052.jpeg
    "3164bf4b2d0f9e75985f636dd1b17fe9f5c972410b577a7b20fc26a04bb0d75e",  # train/Covid/053.jpeg
    "a52d860d148c0e56b16b9380f59246459b8c837474871c26d9e15f07ea36efb4",  # train/Covid/054.jpeg
    "750923c3a9fedbe3a651a856d583d6940f4d934ed8b40d7354b1b660558991c7",  # train/Covid/055.jpeg
    "111fbc102c2c9c5fb40262ce5688978cda2144ae4e68965775af94509e1ed956",  # train/Covid/056.jpg
    "0b9b9367085e9ddf1f8c834dcfeba630a7f3946b79857bf1aba5a6eb5282565c",  # train/Covid/057.jpeg
    "6d2de1b3f01ac32359b6fc65a598646698c1c1dcc28685818b7f2aeae5f756a7",  # train/Covid/058.jpeg
    "dd0c289ee0c7d5262dc5d933cb1d629ab47bf46b9c6a0921a5fab8e60a32f5c8",  # train/Covid/059.jpeg
)}
# Their sizes in bytes: a file of another size cannot be one of them, so only a few files are ever hashed.
BYTE_SIZES = frozenset({46690, 53682, 45078, 50267, 32480, 37438, 43856, 32165, 44885, 39222, 52856, 42051, 29871,
                        37582, 41219, 36650, 49687, 48650, 53744, 36604})


def mislabelled(path: str | os.PathLike) -> str | None:
    """What a file known to be mislabelled really is; None for any other file."""
    path = Path(path)
    if path.stat().st_size not in BYTE_SIZES:
        return None
    return MISLABELLED.get(hashlib.sha256(path.read_bytes()).hexdigest())
