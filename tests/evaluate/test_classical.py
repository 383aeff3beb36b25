"""Classical late-fusion baselines on synthetic features: one informative modality, one pure-noise modality."""

import json

import numpy as np
import pytest

from mmjax.evaluate.classical import classical_late_fusion, majority_vote

NUM_CLASSES = 3


def _split(num, rng):
    labels = np.arange(num) % NUM_CLASSES
    centers = 4.0 * np.eye(NUM_CLASSES, 5)
    informative = centers[labels] + rng.normal(size=(num, 5))
    noise = rng.normal(size=(num, 6))
    return {"informative": informative, "noise": noise}, labels


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train_x, train_y = _split(150, rng)
    test_x, test_y = _split(300, rng)
    return train_x, train_y, test_x, test_y


@pytest.fixture(scope="module")
def results(data):
    return classical_late_fusion(*data, seed=0)


def test_per_modality_and_fused_accuracies(results):
    assert set(results) == {"svm", "random_forest"}
    for kind, result in results.items():
        assert list(result["per_modality"]) == ["informative", "noise"]
        informative = result["per_modality"]["informative"]
        noise = result["per_modality"]["noise"]
        assert informative["accuracy"] >= 0.95, kind
        assert informative["macro_f1"] >= 0.95, kind
        assert noise["accuracy"] < 0.5, kind  # Chance is 1/3.
        assert result["average"]["accuracy"] >= noise["accuracy"], kind
        assert result["vote"]["accuracy"] >= noise["accuracy"], kind
        assert result["average"]["accuracy"] >= 0.7, kind
    json.dumps(results)


def test_deterministic(data, results):
    assert classical_late_fusion(*data, seed=0) == results


def test_single_classifier_and_num_classes(data):
    train_x, train_y, test_x, test_y = data
    out = classical_late_fusion(train_x, train_y, test_x, test_y, classifiers=("svm",), num_classes=4)
    assert list(out) == ["svm"]
    assert out["svm"]["per_modality"]["informative"]["accuracy"] >= 0.95


def test_majority_vote_breaks_ties_by_summed_probability():
    predictions = np.array([[0, 1, 2, 1], [1, 1, 0, 2], [2, 0, 0, 1]])  # 3 modalities, 4 rows.
    probabilities = np.zeros((3, 4, 3))
    probabilities[:, 0] = [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]  # 3-way tie: sums .8/.9/1.3 -> 2.
    probabilities[:, 1] = 1 / 3  # Clear majority for 1.
    probabilities[:, 2] = 1 / 3  # Majority for 0.
    probabilities[:, 3] = 1 / 3  # Majority for 1.
    np.testing.assert_array_equal(majority_vote(predictions, probabilities), [2, 1, 0, 1])
    # An exact probability tie falls to the lowest class id.
    np.testing.assert_array_equal(majority_vote(np.array([[2], [1]]), np.full((2, 1, 3), 1 / 3)), [1])


def test_bad_inputs(data):
    train_x, train_y, test_x, test_y = data
    with pytest.raises(ValueError, match=r"train_features\['noise'\] has 149 rows"):
        classical_late_fusion(train_x | {"noise": train_x["noise"][:-1]}, train_y, test_x, test_y)
    with pytest.raises(ValueError, match=r"missing in test_features \['noise'\]"):
        classical_late_fusion(train_x, train_y, {"informative": test_x["informative"]}, test_y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        classical_late_fusion(train_x, np.zeros_like(train_y), test_x, test_y)
    bad = train_x["informative"].copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"train_features\['informative'\].*NaN.*rows \[3\]"):
        classical_late_fusion(train_x | {"informative": bad}, train_y, test_x, test_y)
    with pytest.raises(ValueError, match=r"modality 'noise' has 6 features in train"):
        classical_late_fusion(train_x, train_y, test_x | {"noise": test_x["noise"][:, :2]}, test_y)
    with pytest.raises(ValueError, match="2-D"):
        classical_late_fusion(train_x | {"noise": train_x["noise"][:, 0]}, train_y, test_x, test_y)
    with pytest.raises(ValueError, match="unknown classifier"):
        classical_late_fusion(train_x, train_y, test_x, test_y, classifiers=("knn",))
    with pytest.raises(ValueError, match="never seen"):
        classical_late_fusion(train_x, train_y, test_x, np.where(test_y == 2, 5, test_y))
