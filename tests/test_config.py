"""passreid.config: _base_ inheritance, dotlist overrides, type checking, unknown keys, round trips."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from passreid.config import (ConfigError, DataConfig, EvalConfig, ModelConfig, OptimConfig,
                             TrainConfig, config_from_dict, config_to_dict, default_argument_parser,
                             dump_config, load_config, load_yaml_with_bases, parse_and_load,
                             save_config)


@dataclass
class HeadConfig:
    kind: Literal["bnneck", "linear"] = "bnneck"
    dims: list[int] = field(default_factory=lambda: [768, 512])
    margin: Optional[float] = None
    depth_scale: float = 1.0


@dataclass
class ExtraConfig:
    head: HeadConfig = field(default_factory=HeadConfig)
    weights: dict[str, float] = field(default_factory=lambda: {"ce": 1.0, "triplet": 1.0})
    cache: Optional[Path] = None
    name: str = "run"


@dataclass
class StageConfig:
    # A stage default that differs from ModelConfig's own default: partial YAML must keep it.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="vit_base", stride_size=12))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extra: ExtraConfig = field(default_factory=ExtraConfig)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- defaults


def test_defaults_are_the_published_recipe():
    model, data, optim, evaluation, train = (ModelConfig(), DataConfig(), OptimConfig(),
                                             EvalConfig(), TrainConfig())
    assert (model.arch, model.img_size, model.stride_size, model.drop_path_rate,
            model.num_part_tokens, model.pretrained, model.hw_ratio) == (
        "vit_small", (256, 128), 16, 0.1, 3, "", 2)
    assert (data.dataset, data.batch_size, data.num_instances, data.num_workers,
            data.skip_corrupt, data.version) == ("market1501", 64, 4, 8, False, "")
    assert (optim.name, optim.lr, optim.momentum, optim.weight_decay, optim.bias_lr_factor,
            optim.warmup_epochs, optim.warmup_lr_factor, optim.min_lr_factor) == (
        "sgd", 4e-4, 0.9, 1e-4, 2.0, 20, 0.01, 0.002)
    assert (evaluation.metric, evaluation.max_rank, evaluation.rerank, evaluation.k1,
            evaluation.k2, evaluation.lambda_value) == ("euclidean", 50, False, 20, 6, 0.3)
    assert (train.epochs, train.precision) == (120, "auto")


def test_no_file_no_overrides_gives_schema_defaults():
    assert load_config(StageConfig) == StageConfig()


def test_schema_must_be_a_dataclass_type():
    with pytest.raises(TypeError, match="dataclass"):
        load_config(dict)


# ---------------------------------------------------------------------------------- _base_


def test_two_level_base_chain_merges_deeply(tmp_path):
    write(tmp_path / "configs/_base_/default.yaml", """\
        model: {drop_path_rate: 0.2, num_part_tokens: 3}
        optim: {lr: 0.008, warmup_epochs: 5}
        train: {epochs: 100}
        """)
    write(tmp_path / "configs/market/base.yaml", """\
        _base_: ../_base_/default.yaml
        optim: {lr: 4e-4}
        data: {dataset: market1501, batch_size: 32}
        """)
    top = write(tmp_path / "configs/market/vit_s.yaml", """\
        _base_: base.yaml
        model: {arch: vit_small}
        optim: {warmup_epochs: 20}
        """)
    cfg = load_config(StageConfig, top)
    assert cfg.model.arch == "vit_small"              # top file
    assert cfg.model.drop_path_rate == 0.2            # grandparent, merged into the same section
    assert cfg.model.stride_size == 12                # stage default kept under a partial section
    assert cfg.optim.lr == pytest.approx(4e-4) and isinstance(cfg.optim.lr, float)  # parent beats grandparent
    assert cfg.optim.warmup_epochs == 20              # top beats grandparent
    assert cfg.train.epochs == 100
    assert cfg.data.batch_size == 32 and cfg.data.num_instances == 4


def test_list_bases_later_wins_and_file_wins_over_all(tmp_path):
    write(tmp_path / "a.yaml", "optim: {lr: 0.1, momentum: 0.5}\ntrain: {seed: 1}\n")
    write(tmp_path / "b.yaml", "optim: {lr: 0.2}\ntrain: {seed: 2, epochs: 7}\n")
    top = write(tmp_path / "sub/top.yaml", "_base_: [../a.yaml, ../b.yaml]\ntrain: {seed: 3}\n")
    cfg = load_config(StageConfig, top)
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.2, 0.5)
    assert (cfg.train.seed, cfg.train.epochs) == (3, 7)
    assert load_yaml_with_bases(top) == {"optim": {"lr": 0.2, "momentum": 0.5},
                                         "train": {"seed": 3, "epochs": 7}}


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular _base_ chain"):
        load_config(StageConfig, tmp_path / "a.yaml")


def test_missing_base_names_the_including_file(tmp_path):
    top = write(tmp_path / "top.yaml", "_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"nope\.yaml.*named in _base_ of .*top\.yaml"):
        load_config(StageConfig, top)


@pytest.mark.parametrize("text", ["_base_: 3\n", "_base_: [a.yaml, 4]\n", "_base_: {x: 1}\n"])
def test_malformed_base_entry(tmp_path, text):
    with pytest.raises(ConfigError, match="_base_ must be a path or a list of paths"):
        load_config(StageConfig, write(tmp_path / "top.yaml", text))


def test_missing_config_file_and_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(StageConfig, tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="top level of a config file must be a mapping"):
        load_config(StageConfig, write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert load_config(StageConfig, write(tmp_path / "empty.yaml", "")) == StageConfig()


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = write(tmp_path / "dup.yaml", "optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(StageConfig, path)


# ---------------------------------------------------------------------------------- overrides


def test_dotlist_values_are_typed(tmp_path):
    cfg = load_config(StageConfig, overrides=[
        "optim.lr=4e-4", "eval.rerank=true", "model.img_size=[384,128]", "data.batch_size=1e2",
        "extra.head.margin=0.3", "extra.name=001", "extra.cache=/tmp/c", "optim.momentum=1",
        "data.version=v2", "extra.head.dims=[16]", "model.pretrained=",
    ])
    assert cfg.optim.lr == 4e-4 and type(cfg.optim.lr) is float
    assert cfg.eval.rerank is True
    assert cfg.model.img_size == (384, 128)
    assert cfg.data.batch_size == 100 and type(cfg.data.batch_size) is int
    assert cfg.extra.head.margin == 0.3
    assert cfg.extra.name == "001"        # a str field keeps the text, not the int 1
    assert cfg.extra.cache == Path("/tmp/c")
    assert cfg.optim.momentum == 1.0 and type(cfg.optim.momentum) is float
    assert cfg.data.version == "v2"
    assert cfg.extra.head.dims == [16]
    assert cfg.model.pretrained == ""


def test_overrides_beat_the_file_and_later_overrides_win(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {lr: 0.1}\nextra: {head: {margin: 0.5}}\n")
    cfg = load_config(StageConfig, path, ["optim.lr=0.2", "optim.lr=0.3", "extra.head.margin=null"])
    assert cfg.optim.lr == 0.3
    assert cfg.extra.head.margin is None


def test_dict_fields_merge_and_sections_accept_mappings():
    cfg = load_config(StageConfig, overrides=["extra.weights.triplet=0.5", "extra.weights.center=2",
                                              "model={arch: vit_tiny}"])
    assert cfg.extra.weights == {"ce": 1.0, "triplet": 0.5, "center": 2.0}
    assert cfg.model.arch == "vit_tiny" and cfg.model.stride_size == 12


def test_exponent_floats_in_yaml_files(tmp_path):
    path = write(tmp_path / "c.yaml", "optim:\n  lr: 4e-4\n  weight_decay: 5E-4\n")
    cfg = load_config(StageConfig, path)
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (4e-4, 5e-4)


@pytest.mark.parametrize("item", ["optim.lr", "=3", "optim..lr=3", "1abc=2", "optim.lr=[1,"])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match="override"):
        load_config(StageConfig, overrides=[item])


def test_overrides_must_be_a_sequence_not_a_string():
    with pytest.raises(TypeError, match="sequence"):
        load_config(StageConfig, overrides="optim.lr=1")


# ---------------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("item, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("extra.head.marginn=1", "unknown config key 'extra.head.marginn' (did you mean 'extra.head.margin'?)"),
    ("lr=1", "unknown config key 'lr' (did you mean 'optim.lr'?)"),
    ("modell.arch=vit_base", "unknown config key 'modell' (did you mean 'model'?)"),
])
def test_unknown_override_key_suggests_the_closest(item, message):
    with pytest.raises(ConfigError) as info:
        load_config(StageConfig, overrides=[item])
    assert message in str(info.value)
    assert "command line" in str(info.value)


def test_unknown_yaml_key_at_depth_names_file_and_suggestion(tmp_path):
    base = write(tmp_path / "base.yaml", "extra:\n  head:\n    dimz: [1, 2]\n")
    top = write(tmp_path / "top.yaml", "_base_: base.yaml\noptim: {lr: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(StageConfig, top)
    text = str(info.value)
    assert "unknown config key 'extra.head.dimz' (did you mean 'extra.head.dims'?)" in text
    assert str(base) in text


def test_unknown_key_without_a_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.zzzzzz'; valid keys under 'optim': name, lr"):
        load_config(StageConfig, overrides=["optim.zzzzzz=1"])


@pytest.mark.parametrize("old, new", [("train.saveckp_freq", "train.keep_checkpoint_period"),
                                      ("train.checkpoint_every_iters", "train.checkpoint_period_iters"),
                                      ("train.stop_after_iters", "train.max_iters")])
def test_a_renamed_key_is_an_error_naming_the_new_one(tmp_path, old, new):
    from passreid.pretrain.config import PretrainConfig

    with pytest.raises(ConfigError, match=f"config key '{old}' is now called '{new}' \\(from command line\\)"):
        load_config(PretrainConfig, overrides=[f"{old}=2"])
    section, key = old.split(".")
    recipe = write(tmp_path / "old.yaml", f"{section}:\n  {key}: 2\n")
    with pytest.raises(ConfigError, match=f"config key '{old}' is now called '{new}'.*{recipe.name}"):
        load_config(PretrainConfig, recipe)
    assert load_config(PretrainConfig, overrides=[f"{new}=2"]).train.__dict__[new.split(".")[1]] == 2


def test_setting_a_key_below_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"cannot set 'optim.lr.x': 'optim.lr' is a float"):
        load_config(StageConfig, overrides=["optim.lr.x=1"])


# ---------------------------------------------------------------------------------- type errors


@pytest.mark.parametrize("item, message", [
    ("optim.lr=fast", "config key 'optim.lr' expects float, got str 'fast'"),
    ("data.batch_size=true", "config key 'data.batch_size' expects int, got bool True"),
    ("data.batch_size=2.5", "config key 'data.batch_size' expects int, got float 2.5"),
    ("eval.rerank=1", "config key 'eval.rerank' expects bool, got int 1"),
    ("model.arch=vit_huge", "config key 'model.arch' must be one of 'vit_tiny', 'vit_small', 'vit_base'; got 'vit_huge'"),
    ("data.version=v3", "config key 'data.version' must be one of '', 'v1', 'v2'; got 'v3'"),
    ("model.img_size=[256]", "config key 'model.img_size' expects 2 items"),
    ("model.img_size=[a,128]", "config key 'model.img_size[0]' expects int, got str 'a'"),
    ("extra.head.margin=abc", "config key 'extra.head.margin' expects float | None, got str 'abc'"),
    ("extra.head.dims=5", "config key 'extra.head.dims' expects list[int], got int 5"),
    ("optim=3", "config key 'optim' must be a mapping of OptimConfig fields, got int 3"),
    ("extra.weights.ce=heavy", "config key 'extra.weights.ce' expects float, got str 'heavy'"),
])
def test_type_mismatch_names_key_type_and_value(item, message):
    with pytest.raises(ConfigError) as info:
        load_config(StageConfig, overrides=[item])
    assert message in str(info.value)


def test_type_error_in_yaml_names_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"'train.epochs' expects int, got str 'many' \(from .*c\.yaml\)"):
        load_config(StageConfig, path)


def test_str_field_in_yaml_rejects_a_number(tmp_path):
    path = write(tmp_path / "c.yaml", "extra: {name: 12}\n")
    with pytest.raises(ConfigError, match="'extra.name' expects str, got int 12"):
        load_config(StageConfig, path)


def test_missing_required_field():
    @dataclass
    class Needs:
        root: str
        workers: int = 2

    with pytest.raises(ConfigError, match="missing required config key 'root'"):
        load_config(Needs)
    assert load_config(Needs, overrides=["root=/x"]) == Needs(root="/x")


# ---------------------------------------------------------------------------------- save / round trip


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(StageConfig, overrides=[
        "optim.lr=3.5e-4", "model.img_size=[384,128]", "extra.name=1e5", "extra.cache=/data/x",
        "extra.head.margin=0.3", "eval.rerank=true", "data.version=v1", "extra.weights.id=0.25",
        "train.output_dir=runs/001",
    ])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(StageConfig, path) == cfg
    assert config_from_dict(StageConfig, config_to_dict(cfg)) == cfg
    text = path.read_text()
    assert "img_size: [384, 128]" in text
    assert "name: '1e5'" in text  # quoted, otherwise it would read back as the float 100000.0
    assert dump_config(cfg) == text


def test_config_to_dict_is_plain_data():
    data = config_to_dict(StageConfig())
    assert data["model"]["img_size"] == [256, 128]
    assert data["extra"]["cache"] is None
    assert data["extra"]["head"] == {"kind": "bnneck", "dims": [768, 512], "margin": None,
                                     "depth_scale": 1.0}


# ---------------------------------------------------------------------------------- command line


def test_parser_has_the_shared_flags():
    args = default_argument_parser("x").parse_args([])
    assert (args.config_file, args.output_dir, args.no_resume, args.data_root, args.print_config, args.debug,
            args.opts) == (None, None, False, None, False, False, [])


def test_options_may_follow_the_overrides():
    args, cfg = parse_and_load(StageConfig, ["optim.lr=1e-3", "--output-dir", "runs/7", "eval.k1=25", "--no-resume",
                                             "--data-root", "/data"])
    assert (cfg.optim.lr, cfg.eval.k1, cfg.train.output_dir, cfg.data.root) == (1e-3, 25, "runs/7", "/data")
    assert args.no_resume and args.opts == ["optim.lr=1e-3", "eval.k1=25"]
    args, cfg = parse_and_load(StageConfig, ["--output-dir", "a", "--", "train.output_dir=b"])
    assert args.opts == ["train.output_dir=b"] and cfg.train.output_dir == "b"
    with pytest.raises(ConfigError, match="override '--no-resume' must look like key=value"):
        parse_and_load(StageConfig, ["--", "--no-resume"])  # after "--" everything is an override


def test_parse_and_load_applies_flags_then_overrides(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {lr: 0.1}\ntrain: {output_dir: from_yaml}\n")
    args, cfg = parse_and_load(StageConfig, ["--config-file", str(path), "--output-dir", "runs/7",
                                             "--data-root", "/data/market", "--no-resume",
                                             "optim.lr=1e-3", "eval.k1=25"])
    assert args.no_resume is True
    assert cfg.train.output_dir == "runs/7" and cfg.data.root == "/data/market"
    assert (cfg.optim.lr, cfg.eval.k1) == (1e-3, 25)
    _, cfg = parse_and_load(StageConfig, ["--output-dir", "a", "--", "train.output_dir=b"])
    assert cfg.train.output_dir == "b"  # trailing overrides come last


def test_parse_and_load_prefers_top_level_output_dir_and_rejects_missing_keys():
    @dataclass
    class Flat:
        output_dir: str = ""
        train: TrainConfig = field(default_factory=TrainConfig)

    _, cfg = parse_and_load(Flat, ["--output-dir", "o"])
    assert cfg.output_dir == "o" and cfg.train.output_dir == "output"
    with pytest.raises(ConfigError, match="--data-root was given but Flat has none of the keys data.root"):
        parse_and_load(Flat, ["--data-root", "/d"])
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        parse_and_load(Flat, ["train.epoch=3"])
