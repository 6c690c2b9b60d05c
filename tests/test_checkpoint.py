"""ldm.checkpoint: safe reading, layouts, strict fitting with helpful errors, EMA, saving."""

import os
import warnings
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import (
    CheckpointError,
    load_model_from_config,
    load_state_dict_into,
    read_checkpoint,
    save_checkpoint,
)
from ldm.modules.ema import LitEma
from ldm.util import apply_overrides, instantiate_from_config


class WritesAFile:
    """Unpickling this in an unsafe loader would run ``exec`` and create ``self.target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


class LightningLikeCallback:
    """Stands for the callback objects real SD .ckpt files carry beside the weights."""

    def __init__(self) -> None:
        self.best_model_score = 1.5


def _model_output(model, cases):
    with torch.no_grad():
        return model.apply_model(cases["unet_x"], cases["unet_t"], cases["unet_context"])


def test_malicious_pickle_runs_nothing_but_weights_still_load(tmp_path, tiny_weights):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_weights, "payload": WritesAFile(target), "global_step": 7}, path)
    with pytest.warns(UserWarning, match=r"builtins\.exec.*without running any code"):
        state_dict, info = read_checkpoint(path)
    assert not target.exists()
    assert state_dict.keys() == tiny_weights.keys() and info["global_step"] == 7


def test_pickle_that_is_only_a_payload_is_an_error(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.ckpt"
    torch.save(WritesAFile(target), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no state dict"):
            read_checkpoint(path)
    assert not target.exists()


def test_lightning_checkpoint_with_foreign_objects_loads(tmp_path, tiny_config, tiny_weights, tiny_cases):
    path = tmp_path / "lightning.ckpt"
    torch.save(
        {"state_dict": tiny_weights, "callbacks": {"ModelCheckpoint": LightningLikeCallback()}, "epoch": 3}, path
    )
    with pytest.warns(UserWarning, match="LightningLikeCallback"):
        model = load_model_from_config(tiny_config, path, device="cpu")
    torch.testing.assert_close(_model_output(model, tiny_cases), tiny_cases["unet_out"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_save_then_load_roundtrip(tmp_path, tiny_model, tiny_config, tiny_cases, suffix):
    path = tmp_path / f"model{suffix}"
    save_checkpoint(tiny_model.state_dict(), path, info={"global_step": 3})
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary files left behind"
    state_dict, _ = read_checkpoint(path)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in state_dict), "original layout"
    loaded = load_model_from_config(tiny_config, path, device="cpu")
    torch.testing.assert_close(_model_output(loaded, tiny_cases), _model_output(tiny_model, tiny_cases))


def test_text_encoder_layout_without_text_model_and_with_position_ids(tiny_config, tiny_weights, tiny_cases):
    flat = {}
    for key, value in tiny_weights.items():
        flat[key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")] = value
    flat["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    model = instantiate_from_config(tiny_config.model, path="model")
    load_state_dict_into(model, flat)
    expected = tiny_weights["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    torch.testing.assert_close(
        model.cond_stage_model.state_dict()["transformer.text_model.final_layer_norm.weight"], expected
    )


def test_missing_and_unexpected_keys_are_summarised(tiny_config, tiny_weights):
    model = instantiate_from_config(tiny_config.model, path="model")
    broken = dict(tiny_weights)
    del broken["model.diffusion_model.out.2.weight"]
    broken["first_stage_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_into(model, broken)
    message = str(err.value)
    assert "1 missing (1 in model.diffusion_model" in message and "model.diffusion_model.out.2.weight" in message
    assert "1 unexpected (1 in first_stage_model" in message


def test_sd2_checkpoint_with_v1_config_names_the_v2_config(tiny_config, tiny_weights, tmp_path):
    width = 64
    v2_config = apply_overrides(tiny_config, [f"model.params.unet_config.params.context_dim={width}"])
    v2_config.model.params.cond_stage_config = {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"layer": "penultimate", "text_cfg": {"width": width, "heads": 4, "layers": 2}},
    }
    v2_model = instantiate_from_config(v2_config.model, path="model")
    path = tmp_path / "sd2-like.safetensors"
    save_checkpoint(v2_model.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_model_from_config(tiny_config, path, device="cpu")
    message = str(err.value)
    assert "sd2-like.safetensors" in message
    assert "v2-inference.yaml" in message and "SD 2.x" in message
    assert f"context is {width} wide in the checkpoint but 32 in the config" in message


def test_ema_weights_can_replace_model_weights(tiny_config, tiny_weights, tiny_cases):
    ema_model = instantiate_from_config(apply_overrides(tiny_config, ["model.params.use_ema=true"]).model, path="model")
    load_state_dict_into(ema_model, tiny_weights, ignore_prefixes=("model_ema.",))
    ema_model.model_ema = LitEma(ema_model.model)  # start the EMA from the loaded weights
    with torch.no_grad():
        for buffer in ema_model.model_ema.buffers():
            if buffer.dim() > 0:
                buffer.mul_(0.5)
    state_dict = ema_model.state_dict()
    assert "model_ema.decay" in state_dict and "model_ema.diffusion_modelout2weight" in state_dict

    plain = instantiate_from_config(tiny_config.model, path="model")
    load_state_dict_into(plain, state_dict)  # model_ema.* is tolerated by a model without EMA
    torch.testing.assert_close(
        plain.model.diffusion_model.out[2].weight, tiny_weights["model.diffusion_model.out.2.weight"]
    )
    load_state_dict_into(plain, state_dict, use_ema_weights=True)
    torch.testing.assert_close(
        plain.model.diffusion_model.out[2].weight, 0.5 * tiny_weights["model.diffusion_model.out.2.weight"]
    )
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_state_dict_into(plain, tiny_weights, use_ema_weights=True)


def test_missing_and_corrupt_files_are_clear(tmp_path, tiny_weights):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tiny_weights}, path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(truncated)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="neither a torch.save checkpoint nor a safetensors file"):
        read_checkpoint(bad)


def test_ckpt_path_in_config_loads_with_ignore_keys(tiny_config, tiny_dir, tiny_weights):
    config = apply_overrides(
        tiny_config,
        [
            f"model.params.ckpt_path={tiny_dir / 'model.safetensors'}",
            "model.params.ignore_keys=[model.diffusion_model.out]",
        ],
    )
    model = instantiate_from_config(config.model, path="model")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    torch.testing.assert_close(model.state_dict()[key], tiny_weights[key])


def test_the_schedule_comes_from_the_config_not_from_a_rounded_copy_in_the_file(tiny_config, tiny_weights):
    from ldm.models.diffusion.schedules import DiscreteSchedule

    rounded = dict(tiny_weights)
    rounded["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000).half().float()  # an fp16 export's copy
    model = load_model_from_config(tiny_config, None, device="cpu")
    computed = model.alphas_cumprod.clone()
    load_state_dict_into(model, rounded)
    assert torch.equal(model.alphas_cumprod, computed)
    assert abs(DiscreteSchedule(model.alphas_cumprod).sigma_min - 0.02917) < 1e-5  # SD's schedule
    with pytest.raises(CheckpointError, match="alphas_cumprod: \\(500,\\) in the checkpoint"):
        load_state_dict_into(model, {**tiny_weights, "alphas_cumprod": torch.ones(500)})


def test_saved_checkpoints_get_the_permissions_the_umask_gives(tmp_path):
    umask = os.umask(0o022)
    try:
        for name in ("model.safetensors", "model.ckpt"):
            save_checkpoint({"w": torch.ones(1)}, tmp_path / name)
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644  # mkstemp's would be 0o600
    finally:
        os.umask(umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt", "model.safetensors"]


class LiveSourceTensors:
    """Wraps ldm.checkpoint.open_checkpoint and tracks the bytes of the file's tensors alive at once."""

    def __init__(self, monkeypatch) -> None:
        import weakref

        import ldm.checkpoint

        self.live = self.peak = self.reads = 0
        self.opened = []
        opener = ldm.checkpoint.open_checkpoint

        def tracked(path, *args):
            tensors, info = opener(path, *args)
            read = tensors._read

            def read_tracked(key, buffer):
                tensor = read(key, buffer)
                self.reads += 1
                self.live += tensor.nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._release, tensor.nbytes)
                return tensor

            tensors._read = read_tracked
            self.opened.append(tensors)
            return tensors, info

        monkeypatch.setattr(ldm.checkpoint, "open_checkpoint", tracked)

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes


def test_loading_holds_one_tensor_of_the_file_at_a_time(tmp_path, tiny_config, tiny_weights, tiny_cases, monkeypatch):
    """An fp16 file into the fp32 model: each file tensor is released once converted, so at most one is alive
    (not the whole file beside the model, as reading the state dict first would keep)."""
    path = tmp_path / "fp16.safetensors"
    save_checkpoint({k: v.half() if v.is_floating_point() else v for k, v in tiny_weights.items()}, path)
    tracker = LiveSourceTensors(monkeypatch)
    model = load_model_from_config(tiny_config, path, device="cpu")
    largest = max(v.nbytes for v in tiny_weights.values()) // 2
    file_bytes = sum(v.nbytes for v in tiny_weights.values()) // 2
    assert tracker.reads > 100 and largest < file_bytes / 2
    assert tracker.peak <= largest, (tracker.peak, largest, file_bytes)
    assert tracker.live == 0
    # The fp16 values were read through one staging buffer, the size of the largest tensor, and not one per tensor.
    assert len(tracker.opened[0]._staging) == largest
    assert all(p.dtype == torch.float32 for p in model.parameters())
    key = "model.diffusion_model.out.2.weight"
    torch.testing.assert_close(model.state_dict()[key], tiny_weights[key].half().float())


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_the_model_takes_the_file_tensors_themselves_in_the_file_dtype(tmp_path, tiny_config, tiny_weights, suffix):
    """dtype=float16 from an fp16 file: every parameter is the tensor read from the file (no float32 copy, no
    second copy), and the computed buffers (noise schedule) stay float32."""
    path = tmp_path / f"fp16{suffix}"
    save_checkpoint({k: v.half() if v.is_floating_point() else v for k, v in tiny_weights.items()}, path)
    model = load_model_from_config(tiny_config, path, device="cpu", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert model.alphas_cumprod.dtype == torch.float32
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[key], tiny_weights[key].half())
    pointers = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers), "every parameter has memory of its own, none shares the file's"


@pytest.mark.parametrize("widen", [False, True])
def test_a_configs_ckpt_path_is_read_a_tensor_at_a_time(tiny_config, tiny_dir, tiny_weights, monkeypatch, widen):
    """``ckpt_path`` (fine-tuning from a file) loads through the lazy reader too: with one tensor a chunk, at most one
    file tensor is alive, also when an inpainting model widens its input convolution from an ordinary file."""
    import ldm.checkpoint

    key = "model.diffusion_model.input_blocks.0.0.weight"
    overrides = [f"model.params.ckpt_path={tiny_dir / 'model.safetensors'}"]
    if widen:
        overrides += [
            "model.target=ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
            "model.params.conditioning_key=hybrid",
            "model.params.unet_config.params.in_channels=9",
            f"model.params.finetune_keys=[{key}]",
        ]
    monkeypatch.setattr(ldm.checkpoint, "LOAD_CHUNK_BYTES", 1)
    tracker = LiveSourceTensors(monkeypatch)
    model = instantiate_from_config(apply_overrides(tiny_config, overrides).model, path="model")
    assert 100 < tracker.reads <= len(tiny_weights) and tracker.live == 0
    assert tracker.peak <= max(v.nbytes for v in tiny_weights.values())
    weight = model.state_dict()[key]
    torch.testing.assert_close(weight[:, :4], tiny_weights[key])
    assert weight.shape[1] == (9 if widen else 4) and bool((weight[:, 4:] == 0).all())
    other = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[other], tiny_weights[other])


def test_load_only_unet_takes_a_file_of_the_diffusion_wrapper(tiny_config, tiny_weights, tmp_path):
    """CompVis's DDPM ``load_only_unet``: the file's keys are the DiffusionWrapper's (``diffusion_model.*``)."""
    from ldm.models.diffusion.ddpm import DDPM

    path = tmp_path / "unet.safetensors"
    unet = {k.removeprefix("model."): v for k, v in tiny_weights.items() if k.startswith("model.diffusion_model.")}
    save_checkpoint(unet, path)
    unet_config = tiny_config.model.params.unet_config
    model = DDPM(unet_config, image_size=8, channels=4, ckpt_path=str(path), load_only_unet=True, use_ema=False)
    key = "diffusion_model.out.2.weight"
    assert torch.equal(model.model.state_dict()[key], unet[key])
