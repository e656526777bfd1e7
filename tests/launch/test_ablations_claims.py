"""launch/ablations.py: each study's claimed differences name its own arms and are tested in results.md."""

from __future__ import annotations

import pytest

from launch import ablations
from launch.stats import compare


@pytest.mark.parametrize("study", ablations.STUDIES)
def test_claims_name_arms_of_their_study(study: str) -> None:
    names = {a.name for a in ablations.study_arms(study)}
    assert ablations.STUDY_CLAIMS[study]
    for a, b in ablations.STUDY_CLAIMS[study]:
        assert a in names and b in names, (study, a, b)


def test_results_markdown_prints_the_tests() -> None:
    settings = {"num_layers": 8, "hidden_size": 128, "num_attention_heads": 4, "seq_length": 128, "batch": 16,
                "steps": 200, "eval_iters": 4}
    row = {"arm": "x", "detail": "d", "final_val_loss": 1.8, "final_val_loss_std": 0.01, "perplexity": 6.0,
           "consumed_layer_tokens": 1, "saved_percent": 0.0, "train_wall_s": 1.0, "seeds": 3}
    a, b = ablations.STUDY_CLAIMS["lr"][0]
    test = compare(a, [1.79, 1.80, 1.81], b, [1.85, 1.86, 1.84]).__dict__
    report = {"settings": settings, "seeds": [1, 2, 3],
              "studies": {"lr": {"rows": [row], "comparisons": [test]}}}
    text = ablations.results_markdown(report)
    assert f"| {a} − {b} | -0.0500" in text and "Welch's t-test" in text
    one = {"settings": settings, "seeds": [1], "studies": {"lr": {"rows": [row], "comparisons": []}}}
    assert "(one seed: no tests)" in ablations.results_markdown(one)


def test_only_rejects_unknown_arm_names(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"--only: unknown arm names \['set 3'\]"):
        ablations.run(["tokenbypass"], {}, ablations.Settings(), [1234], str(tmp_path), only=["set 3"])
