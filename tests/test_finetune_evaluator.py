"""The fine-tuning evaluator's hook for a method's own test distance."""
import numpy as np
import pytest

from passreid.config.schema import EvalConfig
from passreid.eval import rank_metrics
from passreid.eval.distance import pairwise_distance
from passreid.eval.evaluator import evaluate_features
from passreid.eval.features import ExtractedFeatures


def _split(rng: np.random.Generator, num: int, camid: int) -> ExtractedFeatures:
    return ExtractedFeatures(rng.normal(size=(num, 8)).astype(np.float32), rng.integers(0, 5, num),
                             np.full(num, camid))


def test_method_distance_replaces_the_feature_distance():
    rng = np.random.default_rng(0)
    query, gallery = _split(rng, 20, 0), _split(rng, 60, 1)
    # A distance that ranks by the *negated* features: different from the default, so the hook must be used.
    flipped = pairwise_distance(query.feats, -gallery.feats)
    result = evaluate_features(query, gallery, EvalConfig(), distance=lambda start, end: flipped[start:end])
    expected = rank_metrics(query.feats, -gallery.feats, query.pids, gallery.pids, query.camids, gallery.camids)
    default = evaluate_features(query, gallery, EvalConfig())
    assert result.plain.mAP == pytest.approx(expected.mAP)
    assert result.plain.mAP != pytest.approx(default.plain.mAP)


def test_rerank_with_a_method_distance_is_refused():
    rng = np.random.default_rng(1)
    query, gallery = _split(rng, 5, 0), _split(rng, 10, 1)
    with pytest.raises(ValueError, match="eval.rerank"):
        evaluate_features(query, gallery, EvalConfig(rerank=True), distance=lambda s, e: np.zeros((e - s, 10)))
