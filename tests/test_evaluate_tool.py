"""tools/evaluate.py: metrics JSON against the reference evaluator, re-ranking plumbing, bad input."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from passreid.eval import pairwise_distance
from _tool_loading import load_tool_module
from test_rank_metrics import make_case, reference_rank_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOL = REPO_ROOT / "tools" / "evaluate.py"


def load_tool():
    return load_tool_module(TOOL, "evaluate_tool")


@pytest.fixture(scope="module")
def tool():
    return load_tool()


@pytest.fixture()
def case():
    return make_case(11, num_query=20, num_gallery=90, num_ids=12, distractors=15)


def write_split(path: Path, feats, pids, camids, **extra) -> Path:
    np.savez(path, feats=feats, pids=pids, camids=camids, **extra)
    return path


@pytest.fixture()
def files(tmp_path, case):
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = case
    query = write_split(tmp_path / "query.npz", q_feats, q_pids, q_cams)
    gallery = write_split(tmp_path / "gallery.npz", g_feats, g_pids, g_cams)
    return query, gallery, tmp_path / "out" / "metrics.json"


def check_against_reference(report: dict, distmat, case, max_rank: int) -> None:
    _, _, q_pids, g_pids, q_cams, g_cams = case
    expected = reference_rank_metrics(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
    assert report["num_valid_queries"] == expected["num_valid_queries"]
    np.testing.assert_allclose(report["cmc"], expected["cmc"], atol=1e-6)
    assert report["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert report["mINP"] == pytest.approx(expected["mINP"], abs=1e-6)
    assert 0.0 <= report["mINP"] <= report["mAP"] <= 1.0


def test_cli_subprocess_writes_reference_metrics(files, case):
    query, gallery, out = files
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--query", str(query), "--gallery", str(gallery), "--out", str(out),
         "--max-rank", "20", "--chunk-size", "7", "--device", "cpu"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert {"mAP", "mINP", "cmc", "num_valid_queries", "params"} <= set(report)
    assert len(report["cmc"]) == 20 == report["params"]["cmc_length"]
    assert report["params"] | {"query": None, "gallery": None} == {
        "query": None, "gallery": None, "metric": "euclidean", "normalize": True, "max_rank": 20,
        "cmc_length": 20, "chunk_size": 7, "memory_budget_mb": 256.0, "device": "cpu", "rerank": None,
        "tie_rule": "stable: ascending distance, then gallery index",
        "junk_dropped": {"query": 0, "gallery": 0},
    }
    distmat = pairwise_distance(case[0], case[1], device="cpu").numpy()
    check_against_reference(report, distmat, case, max_rank=20)
    for label in ("Rank-1", "Rank-5", "Rank-10", "mAP", "mINP"):
        assert label in proc.stdout
    assert f"{100 * report['mAP']:.2f}" in proc.stdout


def test_cli_subprocess_reports_bad_input(tmp_path, case):
    query = write_split(tmp_path / "query.npz", *(case[i] for i in (0, 2, 4)))
    gallery = tmp_path / "gallery.npz"
    np.savez(gallery, feats=case[1], pids=case[3])  # no camids
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--query", str(query), "--gallery", str(gallery),
         "--out", str(tmp_path / "m.json")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert str(gallery) in proc.stderr and "missing key(s) ['camids']" in proc.stderr
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("extra, metric, normalize", [
    ([], "euclidean", True),
    (["--metric", "cosine"], "cosine", True),
    (["--no-normalize"], "euclidean", False),
])
def test_cli_metric_options(tool, files, case, extra, metric, normalize):
    query, gallery, out = files
    argv = ["--query", str(query), "--gallery", str(gallery), "--out", str(out), "--device", "cpu", *extra]
    assert tool.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["params"]["metric"] == metric and report["params"]["normalize"] == normalize
    assert len(report["cmc"]) == 50
    distmat = pairwise_distance(case[0], case[1], metric=metric, normalize=normalize, device="cpu").numpy()
    check_against_reference(report, distmat, case, max_rank=50)


def test_cli_drops_junk_rows_as_the_market_protocol(tool, tmp_path, capsys):
    """pid -1 rows (junk, kept by tools/extract_features.py) are left out of both splits, not scored as
    negatives: the metrics equal those of the files without them."""
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = make_case(5, num_query=20, num_gallery=90, num_ids=12,
                                                                 distractors=10, junk=12, noise=2.0)
    q_pids = q_pids.copy()
    q_pids[:2] = -1
    with_junk = (write_split(tmp_path / "q.npz", q_feats, q_pids, q_cams),
                 write_split(tmp_path / "g.npz", g_feats, g_pids, g_cams))
    q_keep, g_keep = q_pids != -1, g_pids != -1
    clean = (write_split(tmp_path / "q_clean.npz", q_feats[q_keep], q_pids[q_keep], q_cams[q_keep]),
             write_split(tmp_path / "g_clean.npz", g_feats[g_keep], g_pids[g_keep], g_cams[g_keep]))
    reports = []
    for (query, gallery), name in ((with_junk, "junk"), (clean, "clean")):
        out = tmp_path / f"{name}.json"
        assert tool.main(["--query", str(query), "--gallery", str(gallery), "--out", str(out), "--device", "cpu"]) == 0
        reports.append(json.loads(out.read_text()))
    printed = capsys.readouterr().out
    junk, expected = reports
    assert junk["params"]["junk_dropped"] == {"query": 2, "gallery": 12}
    assert expected["params"]["junk_dropped"] == {"query": 0, "gallery": 0}
    assert "dropped 12 gallery and 2 query rows with pid -1" in printed
    assert printed.count("dropped") == 1
    for key in ("mAP", "mINP", "cmc", "num_valid_queries", "num_gallery"):
        assert junk[key] == expected[key], key
    distmat = pairwise_distance(q_feats[q_keep], g_feats[g_keep], device="cpu").numpy()
    reference = reference_rank_metrics(distmat, q_pids[q_keep], g_pids[g_keep], q_cams[q_keep], g_cams[g_keep])
    assert junk["mAP"] == pytest.approx(reference["mAP"], abs=1e-6)
    # Negative control: scored as negatives, the junk rows would change the result.
    as_negatives = reference_rank_metrics(pairwise_distance(q_feats[q_keep], g_feats, device="cpu").numpy(),
                                          q_pids[q_keep], g_pids, q_cams[q_keep], g_cams)
    assert as_negatives["mAP"] != pytest.approx(junk["mAP"], abs=1e-6)


def test_cli_refuses_a_split_of_junk_only(tool, tmp_path, case, capsys):
    query = write_split(tmp_path / "q.npz", case[0], np.full(len(case[2]), -1), case[4])
    gallery = write_split(tmp_path / "g.npz", case[1], case[3], case[5])
    assert tool.main(["--query", str(query), "--gallery", str(gallery), "--out", str(tmp_path / "m.json")]) == 2
    assert f"{query}: every row has pid -1" in capsys.readouterr().err


def test_cli_small_gallery_truncates_cmc(tool, tmp_path):
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = make_case(2, num_query=6, num_gallery=8, num_ids=3)
    query = write_split(tmp_path / "q.npz", q_feats, q_pids, q_cams)
    gallery = write_split(tmp_path / "g.npz", g_feats, g_pids, g_cams)
    out = tmp_path / "m.json"
    assert tool.main(["--query", str(query), "--gallery", str(gallery), "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert len(report["cmc"]) == 8 == report["params"]["cmc_length"] and report["params"]["max_rank"] == 50


def fake_rerank_module(calls: list, distance: torch.Tensor) -> types.ModuleType:
    """Test double for passreid.eval.rerank (written by another helper): records its arguments."""
    module = types.ModuleType("passreid.eval.rerank")

    def re_ranking(query_feats, gallery_feats, k1=20, k2=6, lambda_value=0.3, *, device=None):
        calls.append(dict(query=query_feats.clone(), gallery=gallery_feats.clone(), k1=k1, k2=k2,
                          lambda_value=lambda_value, device=device))
        return distance.clone()

    module.re_ranking = re_ranking
    return module


def test_cli_rerank_plumbing(tool, files, case, monkeypatch):
    query, gallery, out = files
    # Any (Q, G) distance will do: the tool must evaluate exactly what re_ranking returns.
    distance = torch.from_numpy(np.random.default_rng(0).random((len(case[2]), len(case[3])))).float()
    calls = []
    monkeypatch.setitem(sys.modules, "passreid.eval.rerank", fake_rerank_module(calls, distance))
    argv = ["--query", str(query), "--gallery", str(gallery), "--out", str(out), "--device", "cpu",
            "--rerank", "--k1", "15", "--k2", "4", "--lambda", "0.25"]
    assert tool.main(argv) == 0
    assert len(calls) == 1 and (calls[0]["k1"], calls[0]["k2"], calls[0]["lambda_value"]) == (15, 4, 0.25)
    assert calls[0]["device"] == "cpu"  # --device reaches re-ranking too
    expected_query = torch.nn.functional.normalize(torch.from_numpy(case[0]), dim=1)
    torch.testing.assert_close(calls[0]["query"], expected_query)  # normalised features are re-ranked
    assert calls[0]["gallery"].shape == case[1].shape
    report = json.loads(out.read_text())
    assert report["params"]["rerank"] == {"k1": 15, "k2": 4, "lambda": 0.25}
    check_against_reference(report, distance.numpy(), case, max_rank=50)


def test_cli_rerank_with_real_module(tool, files, case):
    rerank = pytest.importorskip("passreid.eval.rerank", reason="passreid.eval.rerank not written yet")
    query, gallery, out = files
    argv = ["--query", str(query), "--gallery", str(gallery), "--out", str(out), "--device", "cpu", "--rerank"]
    assert tool.main(argv) == 0
    q = torch.nn.functional.normalize(torch.from_numpy(case[0]), dim=1)
    g = torch.nn.functional.normalize(torch.from_numpy(case[1]), dim=1)
    distance = torch.as_tensor(rerank.re_ranking(q, g, k1=20, k2=6, lambda_value=0.3))
    check_against_reference(json.loads(out.read_text()), distance.numpy(), case, max_rank=50)


def _mutated_file(tmp_path, case, which, **changes):
    """Write query/gallery files where ``which`` ("query"|"gallery") gets ``changes`` applied."""
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = case
    splits = {"query": dict(feats=q_feats, pids=q_pids, camids=q_cams),
              "gallery": dict(feats=g_feats, pids=g_pids, camids=g_cams)}
    for key, value in changes.items():
        if value is None:
            del splits[which][key]
        else:
            splits[which][key] = value(splits[which][key])
    paths = {}
    for name, arrays in splits.items():
        paths[name] = tmp_path / f"{name}.npz"
        np.savez(paths[name], **arrays)
    return paths


def _with_nan(feats):
    feats = feats.copy()
    feats[3, 1] = np.nan
    return feats


@pytest.mark.parametrize("which, changes, message", [
    ("gallery", dict(feats=None), r"missing key\(s\) \['feats'\]"),
    ("query", dict(pids=lambda a: a[:-1]), "'pids' has 19 entries but 'feats' has 20 rows"),
    ("gallery", dict(camids=lambda a: a[:5]), "'camids' has 5 entries but 'feats' has 90 rows"),
    ("query", dict(feats=_with_nan), r"'feats' has NaN/Inf values in 1 row\(s\), first at row 3"),
    ("gallery", dict(feats=lambda a: np.where(a > 2.5, np.inf, a)), "NaN/Inf"),
    ("query", dict(feats=lambda a: a[:0], pids=lambda a: a[:0], camids=lambda a: a[:0]), "'feats' is empty"),
    ("query", dict(pids=lambda a: a.astype(np.float32)), "'pids' must be a 1-D integer array.*float32"),
    ("gallery", dict(camids=lambda a: a.reshape(-1, 1)), "'camids' must be a 1-D integer array"),
    ("gallery", dict(feats=lambda a: a.astype(np.int32)), "'feats' must hold floating-point values, got dtype int32"),
])
def test_cli_bad_split_is_reported(tool, tmp_path, case, capsys, which, changes, message):
    paths = _mutated_file(tmp_path, case, which, **changes)
    out = tmp_path / "m.json"
    argv = ["--query", str(paths["query"]), "--gallery", str(paths["gallery"]), "--out", str(out), "--device", "cpu"]
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert str(paths[which]) in err
    assert re.search(message, err), err
    assert not out.exists()


def test_cli_dimension_mismatch_and_unreadable_files(tool, tmp_path, case, capsys):
    paths = _mutated_file(tmp_path, case, "gallery", feats=lambda a: a[:, :7])
    out = tmp_path / "m.json"
    base = ["--out", str(out), "--device", "cpu"]
    assert tool.main(["--query", str(paths["query"]), "--gallery", str(paths["gallery"]), *base]) == 2
    err = capsys.readouterr().err
    assert "feature dimension differs" in err and str(paths["query"]) in err and "D=7" in err

    missing = tmp_path / "nope.npz"
    assert tool.main(["--query", str(missing), "--gallery", str(paths["gallery"]), *base]) == 2
    assert f"feature file not found: {missing}" in capsys.readouterr().err

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not an npz archive")
    assert tool.main(["--query", str(garbage), "--gallery", str(paths["gallery"]), *base]) == 2
    assert f"{garbage}: cannot read it as an .npz archive (not a zip file" in capsys.readouterr().err


def test_cli_queries_without_positives(tool, tmp_path, case, capsys):
    # Every image comes from camera 0: all positives are removed, so no query is valid.
    q_feats, g_feats, q_pids, g_pids, q_cams, g_cams = case
    query = write_split(tmp_path / "q.npz", q_feats, q_pids, np.zeros_like(q_cams))
    gallery = write_split(tmp_path / "g.npz", g_feats, g_pids, np.zeros_like(g_cams))
    argv = ["--query", str(query), "--gallery", str(gallery), "--out", str(tmp_path / "m.json"), "--device", "cpu"]
    assert tool.main(argv) == 2
    assert "no valid query" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--rerank", "--metric", "cosine"], "drop --metric cosine"),
    (["--rerank", "--no-normalize"], "drop --metric cosine / --no-normalize"),
    (["--no-normalize", "--metric", "cosine"], "--no-normalize only applies"),
    (["--max-rank", "0"], "--max-rank must be >= 1"),
    (["--chunk-size", "0"], "--chunk-size must be >= 1"),
])
def test_cli_bad_options(tool, files, capsys, extra, message):
    query, gallery, out = files
    assert tool.main(["--query", str(query), "--gallery", str(gallery), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cli_cuda_request_without_cuda(tool, files, capsys):
    query, gallery, out = files
    assert tool.main(["--query", str(query), "--gallery", str(gallery), "--out", str(out), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
