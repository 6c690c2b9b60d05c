"""ldm.util: config instantiation, error messages that name the config path, and command-line overrides."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import (
    ConfigError,
    apply_overrides,
    default_device,
    get_obj_from_str,
    instantiate_from_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "configs/stable-diffusion/v1-inference.yaml"


def test_instantiate_builds_target_with_params():
    layer = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 5}})
    assert isinstance(layer, torch.nn.Linear) and layer.weight.shape == (5, 3)


@pytest.mark.parametrize("special", ["__is_first_stage__", "__is_unconditional__"])
def test_special_targets_give_none(special):
    assert instantiate_from_config(special) is None
    assert instantiate_from_config({"target": special}) is None


def test_get_obj_from_str_names_missing_attribute():
    with pytest.raises(ConfigError, match=r"has no 'Linaer'.*Did you mean 'Linear'"):
        get_obj_from_str("torch.nn.Linaer")
    with pytest.raises(ConfigError, match="no module named 'ldm.nothere'"):
        get_obj_from_str("ldm.nothere.Thing")


def test_typo_in_nested_target_names_config_path():
    config = load_config(V1, ["model.params.unet_config.target=ldm.modules.diffusionmodules.openaimodel.UNetModle"])
    with torch.device("meta"), pytest.raises(ConfigError) as err:
        instantiate_from_config(config.model, path="model")
    message = str(err.value)
    assert "model.params.unet_config.target" in message and "UNetModle" in message and "UNetModel" in message


def test_wrong_parameter_name_names_config_path():
    config = load_config(V1, ["model.params.first_stage_config.params.ddconfig_typo=1"])
    with torch.device("meta"), pytest.raises(ConfigError) as err:
        instantiate_from_config(config.model, path="model")
    assert "model.params.first_stage_config.params.ddconfig_typo" in str(err.value)


def test_missing_required_parameter_and_missing_target():
    with pytest.raises(ConfigError, match="needs 'out_features'"):
        instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3}})
    with pytest.raises(ConfigError, match="no 'target' key"):
        instantiate_from_config({"params": {}})


def test_overrides_apply_and_add_keys():
    config = load_config(V1, ["model.params.scale_factor=0.5", "model.params.unet_config.params.context_dim=1024"])
    assert config.model.params.scale_factor == 0.5
    assert config.model.params.unet_config.params.context_dim == 1024
    config = apply_overrides(OmegaConf.create({"a": 1}), ["lightning.trainer.max_steps=10"])
    assert config.lightning.trainer.max_steps == 10 and config.a == 1


def test_bad_override_and_missing_file_are_clear():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(V1, ["model.params.scale_factor"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ROOT / "configs/nope.yaml")


def test_configs_merge_left_to_right(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\ny: {z: 2}\n")
    (tmp_path / "b.yaml").write_text("y: {z: 3}\n")
    config = load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"], ["x=4"])
    assert config.x == 4 and config.y.z == 3


def test_a_later_dataset_of_another_class_replaces_the_earlier(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "model: {target: m.A, params: {x: 1}}\n"
        "data: {target: d.M, params: {batch_size: 4, train: {target: d.Folder, params: {size: 512}},"
        " validation: {target: d.Folder, params: {size: 256}}}}\n"
    )
    (tmp_path / "b.yaml").write_text(
        "model: {target: m.B, params: {y: 2}}\n"
        "data: {target: d.M, params: {batch_size: 1, train: {target: d.Kohya, params: {resolution: 64}},"
        " validation: {params: {size: 128}}}}\n"
    )
    config = load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"])
    assert OmegaConf.to_container(config.data.params.train) == {"target": "d.Kohya", "params": {"resolution": 64}}
    assert config.data.params.validation.params.size == 128 and config.data.params.batch_size == 1
    assert dict(config.model.params) == {"x": 1, "y": 2}  # models merge: an overlay may change only the class
    (tmp_path / "c.yaml").write_text("data: {target: d.Other, params: {n: 1}}\n")
    config = load_config([tmp_path / "a.yaml", tmp_path / "c.yaml"])
    assert OmegaConf.to_container(config.data) == {"target": "d.Other", "params": {"n": 1}}


def test_default_device_is_available():
    device = default_device()
    torch.zeros(1, device=device)
    if not torch.cuda.is_available():
        assert device.type in ("cpu", "mps")


def test_typo_in_a_parameter_passed_through_kwargs_is_caught():
    # LatentDiffusion forwards **kwargs to DDPM: the check follows them up the class hierarchy.
    config = load_config(V1, ["model.params.linear_strat=0.001"])
    with torch.device("meta"), pytest.raises(ConfigError) as err:
        instantiate_from_config(config.model, path="model")
    assert "model.params.linear_strat" in str(err.value) and "'linear_start'" in str(err.value)


def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n  a: b: c\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "bad.yaml")
    message = str(err.value)
    assert "\n" not in message and "bad.yaml' is not valid YAML" in message
    assert "did not find expected ',' or ']' at line 2, column 4" in message


def test_a_yaml_file_that_is_a_list_is_not_a_config(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="'.*list.yaml' holds a list at its top level; a config is a mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize(("target", "kind"), [("os.path.sep", "str"), ("math.pi", "float"), ("os.path", "module")])
def test_a_target_that_cannot_build_anything_names_the_config_path(target, kind):
    config = OmegaConf.create({"model": {"target": "torch.nn.Sequential", "params": {}}})
    config.model.target = target
    with pytest.raises(ConfigError, match=rf"^model.target: '{target}' is a {kind}, not a class or function"):
        instantiate_from_config(config.model, path="model")


def test_a_function_is_a_valid_target():
    assert instantiate_from_config({"target": "os.path.join", "params": {"a": "x"}}) == "x"
    with pytest.raises(ConfigError, match="join has no parameter 'b'"):
        instantiate_from_config({"target": "os.path.join", "params": {"b": "x"}})


@pytest.mark.parametrize("node", ["model", "model.params.first_stage_config"])
def test_a_ckpt_path_naming_no_file_is_one_line_naming_key_and_file(node):
    config = load_config(V1, [f"{node}.params.ckpt_path=no/such/model.ckpt"])
    with torch.device("meta"), pytest.raises(ConfigError) as err:
        instantiate_from_config(config.model, path="model")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{node}.params.ckpt_path: checkpoint 'no/such/model.ckpt' does not exist; ")
    assert "remove ckpt_path" in message
