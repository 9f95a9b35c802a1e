"""Every fine-tuning recipe loads, validates and states what it should reproduce."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from passreid.config import ConfigError, load_config
from passreid.finetune import FinetuneConfig, register_method, validate_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "finetune"
RECIPES = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if "_base_" not in p.parts)


def test_recipe_set_covers_the_datasets():
    folders = {p.parent.name for p in RECIPES}
    assert {"market1501", "msmt17_v1", "msmt17_v2", "dukemtmcreid", "occluded_duke", "occluded_reid"} <= folders
    assert (CONFIG_DIR / "demo.yaml") in RECIPES and (CONFIG_DIR / "demo_occluded.yaml") in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_recipe_loads_and_states_its_target(path: Path):
    cfg = validate_config(load_config(FinetuneConfig, path))
    text = path.read_text()
    if path.parent == CONFIG_DIR:  # demos
        assert cfg.data.root == "" and cfg.train.device == "cpu"  # the demo world's folder comes from the command
        return
    assert "Published target" in text or "No published" in text, path
    if path.parent.name.startswith("msmt17"):
        assert cfg.data.dataset == "msmt17" and cfg.data.version == path.parent.name[-2:]
    if path.parent.name == "occluded_reid":
        assert (cfg.data.dataset, cfg.data.test_dataset) == ("market1501", "occluded_reid")
        # Only DPM's published Occluded-REID run embeds cameras (SIE on, with its Rename.py test cameras).
        assert cfg.model.sie_camera is (path.name == "dpm_vit_b_256.yaml")
    if "pass_" in path.name:
        assert cfg.model.head == "pass" and cfg.model.num_part_tokens == 3 and cfg.optim.lr == 4e-4
        assert cfg.optim.warmup_epochs == 20 and cfg.optim.lr_stepping == "pass"
    if "transreid" in path.name:
        assert cfg.model.arch == "vit_base" and cfg.optim.lr == 0.008 and cfg.optim.warmup_epochs == 5
        assert cfg.optim.lr_stepping == "transreid" and cfg.model.head == "cls"
        star = "baseline" not in path.name
        assert cfg.model.jpm is star and cfg.model.sie_camera is (star and path.parent.name != "occluded_reid")
        assert cfg.model.stride_size == (16 if not star else 11 if path.parent.name == "occluded_duke" else 12)
    size = 384 if "_384" in path.name else 256
    assert tuple(cfg.model.img_size) == (size, 128)


def test_validation_names_the_offending_key():
    with pytest.raises(ConfigError, match="model.head"):
        validate_config(load_config(FinetuneConfig, None, ["model.num_part_tokens=0"]))
    with pytest.raises(ConfigError, match="data.batch_size"):
        validate_config(load_config(FinetuneConfig, None, ["data.batch_size=30"]))
    with pytest.raises(ConfigError, match="did you mean 'model.feat_fusion'"):
        load_config(FinetuneConfig, None, ["model.feat_fusoin=cat"])
    with pytest.raises(ConfigError, match="'data.dataset': unknown dataset 'market'; valid names: .*market1501"):
        validate_config(load_config(FinetuneConfig, None, ["data.dataset=market"]))
    with pytest.raises(ConfigError, match="'data.test_dataset': unknown dataset 'occluded'"):
        validate_config(load_config(FinetuneConfig, None, ["data.test_dataset=occluded"]))
    for method, option in (("tsd", "model.sie_camera=true"), ("dpeformer", "model.jpm=true"),
                           ("bpbreid", "model.sie_camera=true")):
        with pytest.raises(ConfigError, match=f"method {method} does not combine with model.sie_camera or model.jpm"):
            validate_config(load_config(FinetuneConfig, None, [f"method={method}", option]))


@pytest.mark.parametrize("key", ["data.world_dir=/w", "data.world_seed=3", "data.world_options={style: b}"])
def test_the_demo_world_keys_are_gone_with_what_to_do_instead(key: str):
    with pytest.raises(ConfigError, match=r"was removed: the stages read folders: .*python -m passreid.demo"):
        load_config(FinetuneConfig, None, [key])


def test_a_model_file_written_by_an_older_version_still_loads(tmp_path: Path):
    import torch

    from passreid.finetune import build_final_checkpoint, build_model, load_finetuned_model
    from passreid.finetune.checkpoints import stored_config

    cfg = load_config(FinetuneConfig, CONFIG_DIR / "demo.yaml", ["data.root=/d/market"])
    final = build_final_checkpoint(build_model(cfg, 4, 2, load_weights=False), cfg, 4, 2)
    # What model_final.pth held before the demo world left the stages.
    final["meta"]["config"]["data"].update(world_dir="/w", world_seed=0, world_options={})
    path = tmp_path / "model_final.pth"
    torch.save(final, path)
    assert "world_dir" not in stored_config(path)["data"]  # finetune/test.py builds its config from this dict
    _, loaded, _ = load_finetuned_model(path)
    assert loaded.data.root == "/d/market"


def test_a_method_section_is_checked_only_when_that_method_runs():
    # The plain recipe does not read tsd.* / dpeformer.* / pass_parts.*: their values cannot stop it ...
    plain = load_config(FinetuneConfig, None, ["tsd.id_weight=-1", "dpeformer.min_selected=0",
                                               "pass_parts.visibility_threshold=2"])
    validate_config(plain)
    # ... and each method checks its own section, naming the key.
    for method, bad, key in (("tsd", "tsd.id_weight=-1", "tsd.id_weight"),
                             ("dpeformer", "dpeformer.min_selected=0", "dpeformer.min_selected"),
                             ("pass_parts", "pass_parts.visibility_threshold=2", "pass_parts.visibility_threshold")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_config(load_config(FinetuneConfig, None, [f"method={method}", bad]))


def test_an_unknown_method_names_the_registered_ones():
    with pytest.raises(ConfigError, match=r"method.*'nope'.*bnneck"):
        validate_config(load_config(FinetuneConfig, None, ["method=nope"]))


# ------------------------------------------------------------------------------ the methods' own sections

METHOD_SECTIONS = ("dpm", "bpbreid", "pass_parts", "tsd", "dpeformer")


def test_each_method_registers_its_own_section_and_the_config_has_one_field_per_section():
    import typing

    from passreid.finetune.methods import get_method, method_sections

    sections = method_sections()
    assert sorted(sections) == sorted(METHOD_SECTIONS)
    hints = typing.get_type_hints(FinetuneConfig)
    for name in METHOD_SECTIONS:
        method = get_method(name)  # each section is named after its method
        assert method.section == name and method.section_type is sections[name]
        # Defined in the method's module, not in passreid.finetune.config.
        assert method.section_type.__module__ == f"passreid.finetune.{name}"
        assert hints[name] is method.section_type and isinstance(getattr(FinetuneConfig(), name), method.section_type)
        assert dataclasses.is_dataclass(method.section_type)
    assert get_method("bnneck").section is None  # bnneck reads the shared sections only
    # The YAML layout is the one every saved config.yaml / model file of older runs has: same top-level keys,
    # in the same order (method sections last).
    assert [f.name for f in dataclasses.fields(FinetuneConfig)] == [
        "method", "model", "data", "loss", "optim", "eval", "train", *METHOD_SECTIONS]


def test_a_section_in_a_recipe_file_loads_typed_and_round_trips(tmp_path: Path):
    from passreid.config import dump_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: dpm\ndpm:\n  mask_blocks: [1, 3]\n  orth_weight: 1\ntsd:\n  teacher_mask: target\n")
    cfg = validate_config(load_config(FinetuneConfig, recipe, ["dpm.arc_margin=0.3"]))
    assert cfg.dpm.mask_blocks == [1, 3] and cfg.dpm.orth_weight == 1.0 and isinstance(cfg.dpm.orth_weight, float)
    assert cfg.dpm.arc_margin == 0.3 and cfg.dpm.arc_scale == 30.0  # unset keys keep the section's defaults
    # The section of a method not selected is loaded and kept (and saved), as before.
    assert cfg.tsd.teacher_mask == "target"
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(FinetuneConfig, saved) == cfg


def test_an_unknown_or_mistyped_key_inside_a_section_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"unknown config key 'dpm\.orth_weigth' \(did you mean 'dpm\.orth_weight'\?\)"):
        load_config(FinetuneConfig, None, ["dpm.orth_weigth=0.01"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tsd:\n  decoder_headz: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'tsd\.decoder_headz'.*r\.yaml"):
        load_config(FinetuneConfig, recipe)
    with pytest.raises(ConfigError, match=r"config key 'bpbreid\.visibility' must be one of 'binary', 'continuous'"):
        load_config(FinetuneConfig, None, ["bpbreid.visibility=soft"])


def test_the_registry_refuses_malformed_or_duplicate_sections():
    from passreid.finetune.dpm import DPMConfig
    from passreid.finetune.methods import FinetuneMethod, build_bnneck_model, build_reid_criterion, list_methods

    def method(**kwargs) -> FinetuneMethod:
        return FinetuneMethod("x_section_test", "test", build_bnneck_model, build_reid_criterion, **kwargs)

    with pytest.raises(ValueError, match="both section and section_type"):
        method(section="x")
    with pytest.raises(TypeError, match="section_type must be a dataclass"):
        method(section="x", section_type=dict)
    with pytest.raises(ValueError, match="already belongs to method 'dpm'"):
        register_method(method(section="dpm", section_type=DPMConfig))
    assert "x_section_test" not in list_methods()


def test_the_config_and_the_registry_must_agree(monkeypatch: pytest.MonkeyPatch):
    from passreid.finetune import config, methods

    # A section field whose method is gone, and a registered section without a field, are both refused.
    monkeypatch.delitem(methods._METHODS, "dpm")
    with pytest.raises(TypeError, match=r"method sections .* differ from the sections"):
        config._check_method_sections()
    monkeypatch.undo()
    config._check_method_sections()  # the real registry agrees

    @dataclasses.dataclass
    class PluginConfig:
        strength: float = 1.0

    plugin = methods.FinetuneMethod("x_plugin", "test", methods.build_bnneck_model, methods.build_reid_criterion,
                                    section="x_plugin", section_type=PluginConfig)
    monkeypatch.setitem(methods._METHODS, "x_plugin", plugin)  # removed again after the test
    with pytest.raises(TypeError, match=r"'x_plugin'.*FinetuneConfig has no field"):
        validate_config(load_config(FinetuneConfig, None, ["method=x_plugin"]))
