"""The public names that code written against CompVis/stable-diffusion, CompVis/latent-diffusion and
Stability-AI/stablediffusion imports, at their original module paths.

What each computes is tested beside its feature; here only that the import works and gives a class or a function.
Names the originals have only for features this project removed are listed in ``LEFT_OUT`` with the reason, and must
stay missing (an accidental stand-in would hide that).
"""

import importlib
import inspect

import pytest

NAMES = """
ldm.util: instantiate_from_config get_obj_from_str log_txt_as_img ismap isimage exists default mean_flat count_params
ldm.models.autoencoder: AutoencoderKL VQModel VQModelInterface IdentityFirstStage
ldm.models.diffusion.ddpm: DDPM LatentDiffusion DiffusionWrapper LatentInpaintDiffusion LatentUpscaleDiffusion
ldm.models.diffusion.ddpm: LatentDepth2ImageDiffusion ImageEmbeddingConditionedLatentDiffusion disabled_train
ldm.models.diffusion.ddim: DDIMSampler
ldm.models.diffusion.plms: PLMSSampler
ldm.models.diffusion.dpm_solver: DPMSolverSampler
ldm.modules.attention: CrossAttention SpatialTransformer BasicTransformerBlock LinearAttention FeedForward GEGLU
ldm.modules.diffusionmodules.openaimodel: UNetModel EncoderUNetModel ResBlock TimestepEmbedSequential TimestepBlock
ldm.modules.diffusionmodules.openaimodel: Downsample Upsample AttentionBlock Timestep
ldm.modules.diffusionmodules.util: make_beta_schedule make_ddim_timesteps make_ddim_sampling_parameters
ldm.modules.diffusionmodules.util: extract_into_tensor noise_like timestep_embedding checkpoint zero_module
ldm.modules.diffusionmodules.util: normalization conv_nd linear avg_pool_nd normal_kl
ldm.modules.diffusionmodules.model: Encoder Decoder ResnetBlock AttnBlock Normalize
ldm.modules.diffusionmodules.upscaling: AbstractLowScaleModel SimpleImageConcat ImageConcatWithNoiseAugmentation
ldm.modules.distributions.distributions: DiagonalGaussianDistribution normal_kl
ldm.modules.ema: LitEma
ldm.modules.encoders.modules: AbstractEncoder FrozenCLIPEmbedder FrozenOpenCLIPEmbedder ClassEmbedder
ldm.modules.encoders.modules: BERTEmbedder BERTTokenizer TransformerEmbedder SpatialRescaler
ldm.modules.encoders.modules: FrozenOpenCLIPImageEmbedder ClipImageEmbedder CLIPEmbeddingNoiseAugmentation
ldm.modules.x_transformer: Encoder TransformerWrapper
ldm.modules.losses: LPIPSWithDiscriminator
ldm.modules.losses.contperceptual: LPIPSWithDiscriminator DummyLoss
ldm.modules.losses.vqperceptual: VQLPIPSWithDiscriminator
ldm.modules.image_degradation: degradation_fn_bsr degradation_fn_bsr_light
ldm.modules.image_degradation.bsrgan: degradation_bsrgan_variant
ldm.modules.image_degradation.bsrgan_light: degradation_bsrgan_variant
ldm.modules.midas.api: MiDaSInference
ldm.modules.midas.midas.dpt_depth: DPTDepthModel
ldm.lr_scheduler: LambdaWarmUpCosineScheduler LambdaWarmUpCosineScheduler2 LambdaLinearScheduler
ldm.data.imagenet: ImageNetTrain ImageNetValidation ImageNetSR ImageNetSRTrain ImageNetSRValidation
ldm.data.lsun: LSUNChurchesTrain LSUNChurchesValidation LSUNBedroomsTrain LSUNBedroomsValidation
ldm.data.lsun: LSUNCatsTrain LSUNCatsValidation
main: DataModuleFromConfig ImageLogger SetupCallback WrappedDataset get_parser
scripts.txt2img: put_watermark load_model_from_config
scripts.img2img: load_img
"""

# Names of the originals that exist only for features this project does not have, and why.
LEFT_OUT = {
    "ldm.modules.attention.MemoryEfficientCrossAttention": "xformers' attention; CrossAttention is PyTorch's SDPA",
    "ldm.modules.attention.SpatialSelfAttention": "no config or model of the originals uses it",
    "ldm.models.diffusion.ddpm.Layout2ImgDiffusion": "LatentDiffusion plots coordinates_bbox layouts itself",
    "ldm.data.base.Txt2ImgIterableBaseDataset": "an abstract base no dataset of the originals derives from",
    "main.nondefault_trainer_args": "Lightning 1.x argparse plumbing; main.py parses its own Trainer flags",
    "main.CUDACallback": "CUDA timing printouts; Lightning's own device stats logger does this",
}


def names() -> list[tuple[str, str]]:
    pairs = []
    for line in NAMES.strip().splitlines():
        module, _, attributes = line.partition(":")
        pairs += [(module.strip(), attribute) for attribute in attributes.split()]
    return pairs


@pytest.mark.parametrize(("module", "name"), names(), ids=[f"{m}.{n}" for m, n in names()])
def test_the_name_imports_from_its_original_path(module, name):
    value = getattr(importlib.import_module(module), name)
    assert inspect.isclass(value) or inspect.isfunction(value) or callable(value), f"{module}.{name} is {value!r}"


@pytest.mark.parametrize("dotted", sorted(LEFT_OUT))
def test_names_left_out_stay_out(dotted):
    module, _, name = dotted.rpartition(".")
    assert not hasattr(importlib.import_module(module), name), f"{dotted} exists now: remove it from LEFT_OUT"


def test_the_count(capsys):
    total = len(names()) + len(LEFT_OUT)
    assert len(set(names())) == len(names()), "a name is listed twice"
    with capsys.disabled():
        print(f"\n{len(names())} of {total} CompVis public names import ({len(LEFT_OUT)} left out on purpose)")
