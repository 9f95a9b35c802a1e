"""tools/search.py: ranked lists equal a brute-force ranking; the HTML page renders in headless Chromium
with one row per query (screenshot kept in tmp); PNG strips and JSON; clear errors."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _inference_models import REPO, train_demo_model
from _tool_loading import load_tool_module
from passreid.inference import FeatureExtractor, list_images, parse_market_names
from passreid.visualization import RankHit, RankRow, format_distance, format_part_distances, write_rank_html

TOPK = 5
NUM_QUERIES = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def search_tool():
    return load_tool_module(REPO / "tools" / "search.py", "search_tool")


@pytest.fixture(scope="module")
def weights(tmp_path_factory, synthetic_world):
    return train_demo_model(tmp_path_factory.mktemp("search") / "demo", synthetic_world)[0]


@pytest.fixture(scope="module")
def report(tmp_path_factory, search_tool, weights, synthetic_world):
    root = tmp_path_factory.mktemp("report")
    out = root / "reports" / "today" / "report.html"  # folders that do not exist yet: search.py creates them
    queries = list_images(synthetic_world / "market" / "query")[:NUM_QUERIES]
    query_dir = root / "queries"
    query_dir.mkdir()
    for path in queries:
        shutil.copy(path, query_dir)
    code = search_tool.main(["--weights", str(weights), "--query", str(query_dir), "--gallery",
                             str(synthetic_world / "market" / "bounding_box_test"), "--topk", str(TOPK),
                             "--out", str(out), "--device", "cpu", "--exclude-same-camera"])
    assert code == 0
    return out


def test_ranked_lists_equal_a_brute_force_ranking(report, weights, synthetic_world):
    record = json.loads(report.with_suffix(".json").read_text())
    gallery = list_images(synthetic_world / "market" / "bounding_box_test")
    queries = [entry["query"] for entry in record["queries"]]
    assert len(queries) == NUM_QUERIES
    extractor = FeatureExtractor(weights, device="cpu")
    q = torch.nn.functional.normalize(extractor(queries), dim=1).double().numpy()
    g = torch.nn.functional.normalize(extractor(gallery), dim=1).double().numpy()
    q_pids, q_cams = parse_market_names(queries)
    g_pids, g_cams = parse_market_names(gallery)
    for i, entry in enumerate(record["queries"]):
        dist = ((q[i][None] - g) ** 2).sum(1)
        allowed = [j for j in np.argsort(dist, kind="stable")
                   if not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
        ranked = [hit["path"] for hit in entry["ranked"]]
        assert len(ranked) == TOPK
        np.testing.assert_allclose([hit["distance"] for hit in entry["ranked"]], dist[allowed[:TOPK]], atol=1e-5)
        # Distances equal up to float rounding may swap places: the files must come from the top of the list.
        assert set(ranked) <= {gallery[j] for j in allowed[:TOPK + 2]}
        for hit in entry["ranked"]:
            j = gallery.index(hit["path"])
            assert hit["same_identity"] == bool(g_pids[j] == q_pids[i])


def test_page_shows_every_distance_with_four_significant_digits(report):
    page = report.read_text()
    distances = [hit["distance"] for entry in json.loads(report.with_suffix(".json").read_text())["queries"]
                 for hit in entry["ranked"]]
    assert all(f"d={format_distance(d)}<" in page for d in distances)


def test_small_distances_are_not_rounded_to_zero(tmp_path):
    assert [format_distance(d) for d in (2.3171e-5, 0.48213, 1.5, 0.0)] == ["2.317e-05", "0.4821", "1.5", "0"]
    image = Image.new("RGB", (64, 128))
    row = RankRow(image, "query", [RankHit(image, "near", 2.3171e-5, True), RankHit(image, "far", 0.48213, False)])
    write_rank_html([row], tmp_path / "page.html", title="t")
    page = (tmp_path / "page.html").read_text()
    assert "d=2.317e-05" in page and "d=0.4821" in page and "d=0.0000" not in page
    assert format_part_distances(["[CLS]", "part 1", "part 2"], [2.5e-5, 0.31234, None]) == \
        "[CLS]:2.5e-05 part 1:0.3123 part 2:n/a"


def test_png_strips_one_per_query(report):
    strips = sorted((report.parent / "report_strips").glob("*.png"))
    assert len(strips) == NUM_QUERIES
    with Image.open(strips[0]) as strip:
        assert strip.width > (TOPK + 1) * 64 and strip.height > 128


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless Chromium (Debian's chromium package) not installed")
def test_html_page_renders_in_headless_chromium(report, tmp_path):
    url = report.resolve().as_uri()
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1100,900"]
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rows = re.findall(r'<tr class="query-row"', dom.stdout)
    assert len(rows) == NUM_QUERIES
    cells = re.findall(r'<td class="(query|match|mismatch|unknown)"', dom.stdout)
    assert cells.count("query") == NUM_QUERIES
    assert len(cells) - NUM_QUERIES == NUM_QUERIES * TOPK
    assert "unknown" not in cells  # Market names: every identity is known
    screenshot = tmp_path / "report.png"
    shot = subprocess.run(base + [f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).reshape(-1, 3).astype(int)
    assert pixels.shape[0] == 1100 * 900
    red = ((pixels[:, 0] > 200) & (pixels[:, 1] < 30) & (pixels[:, 2] < 30)).sum()
    green = ((pixels[:, 0] < 30) & (pixels[:, 1] > 150) & (pixels[:, 2] < 30)).sum()
    assert red + green > 1000  # the coloured frames were drawn (thumbnails decoded, layout rendered)
    print(f"screenshot: {screenshot}")


def test_search_fails_clearly(search_tool, weights, synthetic_world, tmp_path, capsys):
    gallery = str(synthetic_world / "market" / "bounding_box_test")
    common = ["--topk", "3", "--out", str(tmp_path / "r.html"), "--device", "cpu"]
    assert search_tool.main(["--weights", str(tmp_path / "nope.pth"), "--query", gallery, "--gallery", gallery,
                             *common]) == 2
    assert "not found" in capsys.readouterr().err
    assert search_tool.main(["--weights", str(weights), "--query", str(tmp_path / "nothing.jpg"), "--gallery",
                             gallery, *common]) == 2
    assert "not found" in capsys.readouterr().err
    torch.save({"epoch": 1, "optimizer": {}}, tmp_path / "optimizer.pth")
    assert search_tool.main(["--weights", str(tmp_path / "optimizer.pth"), "--query", gallery, "--gallery", gallery,
                             *common]) == 2
    assert "expected one of" in capsys.readouterr().err
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(list_images(gallery)[0], plain / "holiday.jpg")
    assert search_tool.main(["--weights", str(weights), "--query", str(plain), "--gallery", gallery,
                             "--exclude-same-camera", *common]) == 2
    assert "Market-1501" in capsys.readouterr().err


def test_a_gallery_feature_file_ranks_as_the_folder_it_was_extracted_from(report, search_tool, weights,
                                                                          synthetic_world, tmp_path, capsys):
    folder = synthetic_world / "market" / "bounding_box_test"
    features = tmp_path / "gallery.npz"
    extract = load_tool_module(REPO / "tools" / "extract_features.py", "extract_tool")
    assert extract.main(["--weights", str(weights), "--images", str(folder), "--out", str(features),
                         "--device", "cpu"]) == 0
    out = tmp_path / "from_file.html"
    query_dir = report.parent.parent.parent / "queries"
    assert search_tool.main(["--weights", str(weights), "--query", str(query_dir), "--gallery", str(features),
                             "--topk", str(TOPK), "--out", str(out), "--device", "cpu", "--exclude-same-camera"]) == 0
    assert "warning" not in capsys.readouterr().err  # the file names the same model
    from_folder = json.loads(report.with_suffix(".json").read_text())["queries"]
    from_file = json.loads(out.with_suffix(".json").read_text())["queries"]
    # The same features (the same model on the same images, in batches of the same size): the same
    # distances up to float rounding, and the same images where their distances are not tied.
    for a, b in zip(from_folder, from_file):
        np.testing.assert_allclose([h["distance"] for h in a["ranked"]], [h["distance"] for h in b["ranked"]],
                                   atol=1e-6)
        distances = np.array([h["distance"] for h in a["ranked"]])
        gaps = np.diff(distances, prepend=-np.inf, append=np.inf)
        untied = (gaps[:-1] > 1e-5) & (gaps[1:] > 1e-5)
        assert untied.sum() >= TOPK // 2  # the check below compares something
        assert [h["path"] for h, keep in zip(a["ranked"], untied) if keep] == \
            [h["path"] for h, keep in zip(b["ranked"], untied) if keep]


def test_a_gallery_feature_file_of_another_model_or_with_lost_images_is_named(search_tool, weights, synthetic_world,
                                                                              tmp_path, capsys):
    from passreid.eval.feature_file import write_feature_file

    images = list_images(synthetic_world / "market" / "bounding_box_test")[:6]
    query = ["--query", images[0], "--topk", "2", "--out", str(tmp_path / "r.html"), "--device", "cpu"]
    feats = np.random.default_rng(0).standard_normal((6, 7)).astype(np.float32)
    write_feature_file(tmp_path / "small.npz", feats, paths=images, model="another model")
    assert search_tool.main(["--weights", str(weights), "--gallery", str(tmp_path / "small.npz"), *query]) == 2
    assert "its features are 7-D, this model's are" in capsys.readouterr().err
    dim = FeatureExtractor(weights, device="cpu")(images[:1]).shape[1]
    feats = np.random.default_rng(0).standard_normal((6, dim)).astype(np.float32)
    write_feature_file(tmp_path / "other.npz", feats, paths=images, model="another model")
    assert search_tool.main(["--weights", str(weights), "--gallery", str(tmp_path / "other.npz"), *query]) == 0
    assert "was extracted by\n  another model\nthis search runs" in capsys.readouterr().err
    moved = [str(tmp_path / "moved" / Path(image).name) for image in images]
    write_feature_file(tmp_path / "moved.npz", feats, paths=moved)
    assert search_tool.main(["--weights", str(weights), "--gallery", str(tmp_path / "moved.npz"), *query]) == 2
    assert "2 of the 2 gallery images to show are not there (first: " in capsys.readouterr().err
