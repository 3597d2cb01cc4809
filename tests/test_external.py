"""External validation: a bundle evaluated on every image of a labelled folder it was not trained on."""

from __future__ import annotations

import json

from _images import make_class_tree

from covid_xray import cli

CLASSES = ("Covid", "Normal", "Viral Pneumonia")


def test_external_evaluation_reports_metrics_calibration_and_referral(untrained_bundle, tmp_path, capsys):
    site = make_class_tree(tmp_path / "site", classes=CLASSES, per_class=4, size=80)
    assert cli.main(["evaluate", str(untrained_bundle), "--data", f"hospital={site}", "--external", "--json",
                     "--bootstrap", "20"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == "hospital"
    external, referral = result["external"], result["referral"]
    assert external["n"] == 12 and sum(map(sum, external["confusion_matrix"])) == 12
    assert set(external["per_class"]) == set(CLASSES) and 0 <= external["accuracy"] <= 1
    assert 0 <= result["calibration"]["ece"] <= 1
    # Every wrong answer is either referred or confidently wrong.
    wrong = 1 - external["accuracy"]
    assert referral["confidently_wrong_rate"] <= wrong + 1e-9
    assert referral["referred_rate"] + referral["confidently_wrong_rate"] >= wrong - 1e-9
    assert 0 <= referral["covid_sensitivity_with_referral"] <= 1

    assert cli.main(["evaluate", str(untrained_bundle), "--data", str(site), "--external", "--bootstrap", "20"]) == 0
    table = capsys.readouterr().out
    assert "every image of `site`" in table and "confidently wrong" in table


def test_a_site_may_lack_a_class_but_not_bring_an_unknown_one(untrained_bundle, tmp_path, capsys):
    two = make_class_tree(tmp_path / "two", classes=("Covid", "Normal"), per_class=3, size=64)
    assert cli.main(["evaluate", str(untrained_bundle), "--data", str(two), "--external", "--json",
                     "--bootstrap", "10"]) == 0
    assert json.loads(capsys.readouterr().out)["external"]["n"] == 6

    other = make_class_tree(tmp_path / "other", classes=("Covid", "Healthy"), per_class=3, size=64)
    assert cli.main(["evaluate", str(untrained_bundle), "--data", str(other), "--external"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Healthy" in err and "rename those folders" in err


def test_train_refuses_a_bad_external_folder_before_training(tmp_path, capsys):
    data = make_class_tree(tmp_path / "data", classes=CLASSES, per_class=8, size=64)
    other = make_class_tree(tmp_path / "other", classes=("Covid", "Healthy"), per_class=3, size=64)
    common = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--weights", "none", "--image-size", "64"]
    assert cli.main([*common, "--external", f"site={other}"]) == 2
    assert "Healthy" in capsys.readouterr().err
    assert cli.main([*common, "--external", f"site={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err
    assert "missing not found" in err and "another site's films" in err and "covid-xray download" not in err
    assert not (tmp_path / "run" / "model").exists()  # nothing was trained
