"""The building blocks of tiny random-weight models, built offline and deterministically, for tests
and the dev profile: in-memory tokenizers, tiny text-encoder configs, a seeded RNG, and the tiny
CLIP, LLM, depth and SVD models.

Each builder makes real library classes (the same ones a hub checkpoint loads into) with tiny
configs and in-memory tokenizers, so the serving code runs unchanged; only the weights are random.
That is why images from the dev profile look like coloured noise. The families' tiny pipelines
(`ImageFamily.build_tiny`), the scorer and the enhancer build on these; `deployments.tiny.save_tiny`
writes any of them to a folder. Nothing here imports another deployments module.
"""

from __future__ import annotations

from typing import Any

CLIP_MAX_TOKENS = 77


def _byte_level_vocab() -> dict[str, int]:
    # GPT-2 / CLIP byte-to-unicode table: every byte maps to one printable character, so a
    # vocabulary of the 256 byte characters (and their end-of-word forms) covers any text with
    # zero merges.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    chars = [chr(code) for code in codes]
    vocab = {char: index for index, char in enumerate(chars)}
    vocab.update({f"{char}</w>": len(chars) + index for index, char in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_level_vocab(), merges=[], model_max_length=CLIP_MAX_TOKENS)


def tiny_t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -0.5)]
    pieces += [(chr(code), -1.0) for code in range(32, 127)]
    return T5Tokenizer(vocab=pieces, model_max_length=512)


def clip_text_config(tokenizer, **overrides):
    from transformers import CLIPTextConfig

    params = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        max_position_embeddings=CLIP_MAX_TOKENS,
    )
    params.update(overrides)
    return CLIPTextConfig(**params)


def seeded(seed: int):
    import torch

    devices: list = []
    rng = torch.random.fork_rng(devices=devices)
    rng.__enter__()
    torch.manual_seed(seed)
    return rng


def tiny_vae(scaling_factor: float, **overrides):
    """A tiny AutoencoderKL of the image families' kind, keeping the real ones' 8x downsampling (four
    blocks), so a request's latent is the size the real model's would be; `overrides` for a family's
    own settings (FLUX.1's shift factor and no quant convs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor, **overrides,
    )


def eval_mode(*modules) -> None:
    # Directly constructed modules start in training mode (dropout on: T5's default rate is
    # 0.1), which would make every call random; from_pretrained returns them in eval mode.
    for module in modules:
        module.eval()


def build_tiny_clip(seed: int = 0) -> dict[str, Any]:
    """A CLIPModel with tiny random weights plus its tokenizer and (PIL) image processor."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = seeded(seed)
    try:
        tokenizer = tiny_clip_tokenizer()
        config = CLIPConfig(
            text_config=clip_text_config(tokenizer).to_dict(),
            vision_config=CLIPVisionConfig(
                hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                image_size=32, patch_size=8, projection_dim=32,
            ).to_dict(),
            projection_dim=32,
        )
        model = CLIPModel(config)
    finally:
        rng.__exit__(None, None, None)
    eval_mode(model)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return {"model": model, "tokenizer": tokenizer, "image_processor": image_processor}


def build_tiny_svd(seed: int = 0):
    """A StableVideoDiffusionPipeline with tiny random weights (8 frames by default).

    The VAE keeps the real 8x downsampling (its temporal decoder fixes 32 norm groups, hence 32
    channels); the image encoder keeps image_size 224 because the pipeline resizes its input
    image to 224 before encoding it.
    """
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = seeded(seed)
    try:
        unet = UNetSpatioTemporalConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=8, out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            cross_attention_dim=32, num_attention_heads=(2, 4), projection_class_embeddings_input_dim=96,
            addition_time_embed_dim=32, num_frames=8,
        )
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4, latent_channels=4, layers_per_block=1,
        )
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                intermediate_size=37, patch_size=32,
            )
        )
    finally:
        rng.__exit__(None, None, None)
    eval_mode(unet, vae, image_encoder)
    # The scheduler settings of the released SVD checkpoints.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    feature_extractor = CLIPImageProcessorPil(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224})
    return StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor
    )


# A ChatML template, the format Qwen's instruction-tuned models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llm_tokenizer():
    """A byte-level BPE tokenizer with no merges (one token per byte: any text round-trips) and ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: index for index, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
    )


def build_tiny_llm(seed: int = 0) -> dict[str, Any]:
    """A Qwen2 causal LM (the architecture of Qwen2.5-Instruct) with tiny random weights, and its tokenizer.

    Its answers are gibberish: that is what the enhancer's guardrails must catch."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_llm_tokenizer()
    rng = seeded(seed)
    try:
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        ))
    finally:
        rng.__exit__(None, None, None)
    eval_mode(model)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return {"model": model, "tokenizer": tokenizer}


def build_tiny_depth(seed: int = 0) -> dict[str, Any]:
    """A DPTForDepthEstimation with tiny random weights and its (PIL) image processor."""
    from transformers import DPTConfig, DPTForDepthEstimation
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    rng = seeded(seed)
    try:
        model = DPTForDepthEstimation(
            DPTConfig(
                hidden_size=32, num_hidden_layers=4, backbone_out_indices=[0, 1, 2, 3], num_attention_heads=4,
                intermediate_size=37, image_size=32, patch_size=8, neck_hidden_sizes=[8, 16, 16, 16],
                fusion_hidden_size=16, head_hidden_size=8, is_hybrid=False,
            )
        )
    finally:
        rng.__exit__(None, None, None)
    eval_mode(model)
    image_processor = DPTImageProcessorPil(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    return {"model": model, "image_processor": image_processor}
