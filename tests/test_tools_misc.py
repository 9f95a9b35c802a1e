"""tools/extract_features.py, visualize_ranks.py, plot_training.py: outputs on the generated world (and
real Market-1501 when present), and clear errors on missing files / checkpoints of the wrong kind."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from _inference_models import REPO, save_backbone_export, tiny_pass_vit, train_demo_model
from _tool_loading import load_tool_module
from passreid.data import build_dataset
from passreid.finetune.testing import run_test


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tool(name):
    return load_tool_module(REPO / "tools" / f"{name}.py", f"{name}_tool")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, synthetic_world):
    """A briefly trained demo model and its test.py outputs (metrics.json, query/gallery features)."""
    root = tmp_path_factory.mktemp("misc")
    weights, _ = train_demo_model(root / "demo", synthetic_world)
    outputs = run_test(weights, None, root / "test")
    return weights, outputs


@pytest.fixture(scope="module")
def market(synthetic_world):
    return build_dataset("market1501", synthetic_world / "market")


def test_extract_features_writes_the_evaluate_npz(demo, market, synthetic_world, tmp_path):
    weights, outputs = demo
    out = tmp_path / "gallery.npz"
    code = _tool("extract_features").main(["--weights", str(weights), "--images",
                                           str(synthetic_world / "market" / "bounding_box_test"), "--out", str(out),
                                           "--device", "cpu"])
    assert code == 0
    with np.load(out, allow_pickle=False) as archive:
        data = {key: archive[key] for key in archive.files}
    assert sorted(data) == ["camids", "feats", "model", "paths", "pids"]
    assert str(data["model"]).startswith("finetuned model from ")
    # The folder holds the reader's gallery plus pid -1 junk (which the reader drops): same rows otherwise.
    kept = data["pids"] != -1
    assert (~kept).sum() > 0
    assert [str(p) for p in data["paths"][kept]] == [item.path for item in market.gallery]
    with np.load(outputs.gallery_features) as reference:
        np.testing.assert_array_equal(data["pids"][kept], reference["pids"])
        np.testing.assert_array_equal(data["camids"][kept], reference["camids"])
        np.testing.assert_allclose(data["feats"][kept], reference["feats"], atol=1e-5, rtol=0)
    evaluate = _tool("evaluate")
    assert evaluate.load_split(out).feats.shape == data["feats"].shape  # the format tools/evaluate.py reads


@pytest.mark.parametrize("device, message", [
    ("bogus", "device 'bogus' is not a device name (expected e.g. cpu, cuda or cuda:0)"),
    ("cuda", "device 'cuda' was requested but CUDA is not available"),
])
def test_a_device_that_cannot_be_used_is_one_message(demo, synthetic_world, tmp_path, capsys, monkeypatch, device,
                                                      message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for tool, options in (("extract_features", ["--images", str(synthetic_world / "market" / "query"),
                                                "--out", str(tmp_path / "f.npz")]),
                          ("visualize_ranks", ["--query-features", str(demo[1].query_features),
                                               "--gallery-features", str(demo[1].gallery_features),
                                               "--out", str(tmp_path / "r.html")])):
        assert _tool(tool).main(["--weights", str(demo[0]), *options, "--device", device]) == 2, tool
        assert message in capsys.readouterr().err, tool


def test_extract_features_without_dataset_naming_has_no_labels(demo, market, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for index, item in enumerate(market.query[:3]):
        shutil.copy(item.path, folder / f"person_{index}.jpg")
    out = tmp_path / "mine.npz"
    assert _tool("extract_features").main(["--weights", str(demo[0]), "--images", str(folder / "*.jpg"),
                                           "--out", str(out), "--device", "cpu"]) == 0
    with np.load(out) as archive:
        assert sorted(archive.files) == ["feats", "model", "paths"]
        assert archive["feats"].shape[0] == 3


def test_visualize_ranks_from_saved_features_and_a_split(demo, synthetic_world, tmp_path):
    weights, outputs = demo
    out = tmp_path / "ranks"
    code = _tool("visualize_ranks").main([
        "--query-features", str(outputs.query_features), "--gallery-features", str(outputs.gallery_features),
        "--dataset", "market1501", "--data-root", str(synthetic_world / "market"), "--weights", str(weights),
        "--out", str(out), "--num-queries", "3", "--topk", "4", "--device", "cpu"])
    assert code == 0
    page = (out / "index.html").read_text()
    assert len(re.findall(r'<tr class="query-row"', page)) == 3
    assert len(re.findall(r'<td class="(?:match|mismatch)"', page)) == 3 * 4
    # Per-part distances of the PASS [CLS] and 3 part tokens under every hit (4 significant digits).
    assert len(re.findall(r"part 3:[0-9.e+-]+<", page)) == 3 * 4
    assert len(list((out / "strips").glob("*.png"))) == 3
    maps = sorted((out / "maps").glob("*.png"))
    assert len(maps) == 3
    with Image.open(maps[0]) as grid:  # rows: query + 4 hits; columns: label, image, [CLS], 3 parts
        assert grid.height > 5 * 128 and grid.width >= 6 * 64
    # The top hits are the nearest gallery rows of the saved features, same identity + camera skipped.
    with np.load(outputs.query_features) as q, np.load(outputs.gallery_features) as g:
        qf = q["feats"][0] / np.linalg.norm(q["feats"][0])
        gf = g["feats"] / np.linalg.norm(g["feats"], axis=1, keepdims=True)
        dist = ((qf - gf) ** 2).sum(1)
        dist[(g["pids"] == q["pids"][0]) & (g["camids"] == q["camids"][0])] = np.inf
        best = np.sort(dist)[0]
    first_hit = float(re.search(r'<td class="(?:match|mismatch)">.*?<div>#1 d=([^<]+)</div>', page).group(1))
    # Shown with 4 significant digits (relative rounding <= 5e-4); the model's and numpy's float32 sums may
    # differ in the last bits, far inside that.
    assert first_hit == pytest.approx(best, rel=1e-3)


def test_visualize_ranks_without_weights_and_mismatched_features(demo, synthetic_world, tmp_path, capsys):
    weights, outputs = demo
    tool = _tool("visualize_ranks")
    common = ["--dataset", "market1501", "--data-root", str(synthetic_world / "market"), "--num-queries", "2",
              "--topk", "3"]
    assert tool.main(["--query-features", str(outputs.query_features), "--gallery-features",
                      str(outputs.gallery_features), "--out", str(tmp_path / "plain"), *common]) == 0
    assert not list((tmp_path / "plain" / "maps").glob("*.png"))
    # Files without image paths (older ones, or written by hand) take them from the split, which is checked:
    # gallery features passed as the query are refused.
    with np.load(outputs.gallery_features) as archive:
        without_paths = tmp_path / "no_paths.npz"
        np.savez(without_paths, **{key: archive[key] for key in ("feats", "pids", "camids")})
    assert tool.main(["--query-features", str(without_paths), "--gallery-features",
                      str(outputs.gallery_features), "--out", str(tmp_path / "bad"), *common]) == 2
    assert "do not match the query split" in capsys.readouterr().err
    # test.py's own files name their images: no data set is needed.
    assert tool.main(["--query-features", str(outputs.query_features), "--gallery-features",
                      str(outputs.gallery_features), "--out", str(tmp_path / "no_dataset"), "--num-queries", "1",
                      "--topk", "2"]) == 0
    assert len(re.findall(r'<td class="(?:match|mismatch)"', (tmp_path / "no_dataset" / "index.html").read_text())) == 2
    assert tool.main(["--query-features", str(tmp_path / "none.npz"), "--gallery-features",
                      str(outputs.gallery_features), "--out", str(tmp_path / "bad"), *common]) == 2
    assert "not found" in capsys.readouterr().err


def test_visualize_ranks_shows_chosen_queries_and_can_keep_same_camera_hits(demo, synthetic_world, tmp_path, capsys):
    _, outputs = demo
    tool = _tool("visualize_ranks")
    common = ["--query-features", str(outputs.query_features), "--gallery-features", str(outputs.gallery_features),
              "--dataset", "market1501", "--data-root", str(synthetic_world / "market"), "--topk", "2"]
    out = tmp_path / "chosen"
    assert tool.main([*common, "--out", str(out), "--query-indices", "4", "1", "--keep-same-camera"]) == 0
    page = (out / "index.html").read_text()
    with np.load(outputs.query_features) as q, np.load(outputs.gallery_features) as g:
        query_feats, gallery_feats = q["feats"], g["feats"]
    assert len(re.findall(r'<tr class="query-row"', page)) == 2 and "same-camera matches kept" in page
    # In the order given; with same-camera matches kept, each query's first hit is its nearest gallery row.
    shown = [float(d) for d in re.findall(r'<td class="(?:match|mismatch)">.*?<div>#1 d=([^<]+)</div>', page)]
    for index, first_hit in zip([4, 1], shown):
        qf = query_feats[index] / np.linalg.norm(query_feats[index])
        gf = gallery_feats / np.linalg.norm(gallery_feats, axis=1, keepdims=True)
        # 4 significant digits shown (relative rounding <= 5e-4).
        assert first_hit == pytest.approx(((qf - gf) ** 2).sum(1).min(), rel=1e-3)
    assert tool.main([*common, "--out", str(tmp_path / "bad"), "--query-indices", "10000"]) == 2
    assert "--query-indices [10000] outside" in capsys.readouterr().err


def test_plot_training_draws_the_curves(demo, tmp_path, capsys):
    weights, _ = demo
    tool = _tool("plot_training")
    out = tmp_path / "curves.png"
    assert tool.main([str(weights.parent), "--out", str(out)]) == 0
    assert "loss, lr, mAP" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width >= 900 and image.height >= 300
        assert len(set(np.asarray(image.convert("L")).ravel().tolist())) > 10  # not a blank canvas
    series = tool.read_metrics(weights.parent / "metrics.jsonl")
    assert [step for step, _ in series[("train", "loss")]] == list(range(1, 7))
    assert len(series[("eval", "mAP")]) == 1


def test_plot_training_fails_clearly(tmp_path, capsys):
    tool = _tool("plot_training")
    assert tool.main([str(tmp_path / "run"), "--out", str(tmp_path / "c.png")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    bad = tmp_path / "metrics.jsonl"
    bad.write_text(json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\nnot json\n")
    assert tool.main([str(bad), "--out", str(tmp_path / "c.png")]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err
    bad.write_text(json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n")
    assert tool.main([str(bad), "--out", str(tmp_path / "c.png"), "--keys", "mAP"]) == 2
    assert "available: ['loss']" in capsys.readouterr().err
    bad.write_text(json.dumps({"step": None, "split": "train", "loss": 1.0}) + "\n")
    assert tool.main([str(bad), "--out", str(tmp_path / "c.png")]) == 2
    assert "metrics.jsonl:1: expected a record with an integer 'step'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["extract_features", "search", "visualize_ranks", "export_onnx"])
def test_every_tool_rejects_missing_and_wrong_kind_weights(name, demo, market, tmp_path, capsys):
    weights, outputs = demo
    query = market.query[0].path
    args = {
        "extract_features": ["--images", query, "--out", str(tmp_path / "f.npz")],
        "search": ["--query", query, "--gallery", query, "--out", str(tmp_path / "r.html")],
        "visualize_ranks": ["--query-features", str(outputs.query_features), "--gallery-features",
                            str(outputs.gallery_features), "--out", str(tmp_path / "v")],
        "export_onnx": ["--out", str(tmp_path / "m.onnx")],
    }[name]
    tool = _tool(name)
    assert tool.main(["--weights", str(tmp_path / "missing.pth"), *args]) == 2
    assert "not found" in capsys.readouterr().err
    torch.save({"optimizer": {"state": {}}, "epoch": 2}, tmp_path / "optimizer_only.pth")
    assert tool.main(["--weights", str(tmp_path / "optimizer_only.pth"), *args]) == 2
    err = capsys.readouterr().err
    assert "not a model file" in err and "model_final.pth" in err and "backbone" in err
    np.save(tmp_path / "array.npy", np.zeros(3))
    assert tool.main(["--weights", str(tmp_path / "array.npy"), *args]) == 2
    assert f"{tmp_path / 'array.npy'} is not a PyTorch checkpoint" in capsys.readouterr().err


@pytest.mark.realdata
@pytest.mark.slow
def test_extract_features_on_real_market1501_images(demo, market1501_root, tmp_path):
    weights, _ = demo
    out = tmp_path / "real.npz"
    pattern = str(market1501_root / "query" / "0001_c*.jpg")
    assert _tool("extract_features").main(["--weights", str(weights), "--images", pattern, "--out", str(out),
                                           "--device", "cpu"]) == 0
    with np.load(out) as archive:
        assert archive["feats"].shape[0] == len(archive["paths"]) >= 2
        assert set(archive["pids"].tolist()) == {1}
        assert archive["camids"].min() >= 0 and archive["camids"].max() <= 5
        assert np.isfinite(archive["feats"]).all()
    backbone = save_backbone_export(tmp_path / "backbone.pth", tiny_pass_vit())
    gallery = tmp_path / "gallery.npz"
    assert _tool("extract_features").main(["--weights", str(backbone), "--images",
                                           str(market1501_root / "bounding_box_test" / "000[0-2]_c*.jpg"), "--out",
                                           str(gallery), "--device", "cpu"]) == 0
    assert _tool("extract_features").main(["--weights", str(backbone), "--images", pattern, "--out",
                                           str(tmp_path / "query.npz"), "--device", "cpu"]) == 0
    # Feature files with paths need no dataset reader; the backbone shows [CLS] + 3 part-token maps.
    ranks = tmp_path / "ranks"
    assert _tool("visualize_ranks").main(["--query-features", str(tmp_path / "query.npz"), "--gallery-features",
                                          str(gallery), "--weights", str(backbone), "--out", str(ranks),
                                          "--num-queries", "2", "--topk", "5", "--device", "cpu"]) == 0
    page = (ranks / "index.html").read_text()
    assert len(re.findall(r'<tr class="query-row"', page)) == 2
    assert "part 3:" in page and len(list((ranks / "maps").glob("*.png"))) == 2
