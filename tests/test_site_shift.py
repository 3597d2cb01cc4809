"""Checking a site without labels: the statistics on planted shifts, and `covid-xray check-site` on films."""

from __future__ import annotations

import json

import numpy as np
from _images import encode, xray_like
from PIL import ImageFilter, ImageOps

from covid_xray import cli
from covid_xray.site_shift import MIN_FILMS, Reference, check

CLASSES = ["Covid", "Normal", "Viral Pneumonia"]


def reference(rng: np.random.Generator, n: int = 60, referred: int = 6) -> Reference:
    return Reference(n=n, referred=referred, scores=rng.gamma(4, 0.02, n).tolist(),
                     class_mix={c: 1 / 3 for c in CLASSES})


def test_a_split_of_the_same_data_is_not_shifted_and_a_planted_shift_is():
    rng = np.random.default_rng(0)
    ref = reference(rng)
    labels = list(rng.choice(CLASSES, 200))
    same = check(ref, rng.gamma(4, 0.02, 200), rng.random(200) < 0.1, labels)
    assert same.shifted is False and not same.reasons and "not shifted" in same.verdict
    # Farther from the training films (a scanner the model never saw): the score test catches it.
    farther = check(ref, rng.gamma(4, 0.02, 200) + 0.05, rng.random(200) < 0.1, labels)
    assert farther.shifted is True and farther.score_p < 0.01 and len(farther.reasons) == 1
    # As close, but referred three times as often: the referral test catches it.
    referred = check(ref, rng.gamma(4, 0.02, 200), rng.random(200) < 0.3, labels)
    assert referred.shifted is True and referred.referred_p < 0.01 and "referred" in referred.reasons[0]
    assert referred.expected_referred[0] < 0.1 < referred.expected_referred[1]
    # The predicted class mix is reported, not judged: a site may see more Covid.
    covid_heavy = check(ref, rng.gamma(4, 0.02, 200), rng.random(200) < 0.1, ["Covid"] * 200)
    assert covid_heavy.shifted is False and covid_heavy.class_mix["Covid"] == 1.0


def test_a_significant_but_small_difference_is_not_a_shift():
    rng = np.random.default_rng(2)
    ref = Reference(n=400, referred=40, scores=rng.gamma(4, 0.02, 400).tolist(), class_mix={c: 1 / 3 for c in CLASSES})
    slightly = check(ref, rng.gamma(4, 0.02, 4000) + 0.01, rng.random(4000) < 0.1, ["Covid"] * 4000)
    assert slightly.score_p < 0.01 and slightly.score_effect < 0.71 and slightly.shifted is False


def test_too_few_films_give_no_verdict():
    rng = np.random.default_rng(1)
    result = check(reference(rng), rng.gamma(4, 0.02, MIN_FILMS - 1) + 1, [True] * (MIN_FILMS - 1),
                   ["Covid"] * (MIN_FILMS - 1))
    assert result.shifted is None and "too few" in result.verdict
    nothing = check(reference(rng), [], [], [])  # a server that has answered nothing yet
    assert nothing.n == 0 and nothing.shifted is None and "too few" in nothing.to_dict()["verdict"]


def test_check_site_command_on_familiar_and_on_shifted_films(untrained_bundle, tmp_path, capsys):
    familiar, shifted = tmp_path / "familiar", tmp_path / "shifted"
    familiar.mkdir(), shifted.mkdir()
    for i in range(40):
        film = xray_like(256, seed=7000 + i)
        (familiar / f"{i}.jpg").write_bytes(encode(film, "JPEG"))
        other = ImageOps.invert(film.convert("L").filter(ImageFilter.GaussianBlur(6)).crop((0, 0, 140, 256)))
        (shifted / f"{i}.png").write_bytes(encode(other, "PNG"))
    (shifted / "broken.png").write_bytes(b"not an image")

    assert cli.main(["check-site", str(untrained_bundle), str(familiar)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("not shifted") and "| referred |" in out
    assert cli.main(["check-site", str(untrained_bundle), str(shifted), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["shifted"] is True and result["n"] == 40 and result["skipped_images"] == 1
    assert result["verdict"].startswith("shifted") and "broken.png" in captured.err


def test_check_site_refuses_a_bundle_without_a_reference(untrained_bundle, tmp_path, capsys):
    import shutil

    from covid_xray.bundle import CONFIG

    old = tmp_path / "old"
    shutil.copytree(untrained_bundle, old)
    config = json.loads((old / CONFIG).read_text())
    del config["site_reference"]
    (old / CONFIG).write_text(json.dumps(config))
    (tmp_path / "a.jpg").write_bytes(encode(xray_like(256, seed=1), "JPEG"))
    assert cli.main(["check-site", str(old), str(tmp_path / "a.jpg")]) == 2
    assert "retrain" in capsys.readouterr().err
