"""The original's LoRA, rebuilt in PyTorch for the LoRA tests (diffusers 0.19.3 behaviour).

Text encoder: `LoraLoaderMixin._modify_text_encoder(..., patch_mlp=True)` wrapped every layer's q/k/v/out
projection and fc1/fc2 in a `PatchedLoraProjection` (forward: linear(x) + lora(x)), and the training
script saved `{name: param for name, param in text_encoder.named_parameters() if it is a LoRA param}`.
diffusers 0.42 still ships `PatchedLoraProjection`, so it is used as is; transformers 5 dropped
`CLIPTextModel.text_model`, so the `text_model.` the original's names had is put back.

UNet: a 0.19 `LoRAAttnProcessor` held `to_{q,k,v,out}_lora` LoRALinearLayers and computed
`attn.to_q(h) + to_q_lora(h)` (same for k, v on the context and for to_out[0] on the attention output);
the file was `AttnProcsLayers(unet.attn_processors).state_dict()`. Current diffusers' processors know
no LoRA, so the same sums are made with forward hooks on to_q, to_k, to_v and to_out[0]: a hook sees
the very input the 0.19 processor passed to both the linear and its LoRA, and adds the LoRA output to
the linear's output, which is the 0.19 computation term for term (not the fused W + up @ down).
"""

import torch
from diffusers.loaders.utils import AttnProcsLayers
from diffusers.models.lora import LoRALinearLayer, PatchedLoraProjection

TEXT_TARGETS = {"self_attn": ("q_proj", "k_proj", "v_proj", "out_proj"), "mlp": ("fc1", "fc2")}
UNET_TARGETS = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}


def _randomise(layer: LoRALinearLayer, generator: torch.Generator, up_std: float) -> None:
    # Training moves `up` off zero; a non-zero `up` makes the LoRA visible in every output.
    with torch.no_grad():
        layer.down.weight.normal_(0.0, 1.0 / layer.rank, generator=generator)
        layer.up.weight.normal_(0.0, up_std, generator=generator)


def patch_text_encoder(text_encoder, rank: int, seed: int = 0, up_std: float = 0.1) -> dict[str, torch.Tensor]:
    """Wraps the targets in PatchedLoraProjection (float32 LoRA) with random factors; returns the original's file dict."""
    generator = torch.Generator().manual_seed(seed)
    root = getattr(text_encoder, "text_model", text_encoder)
    for layer in root.encoder.layers:
        for parent_name, names in TEXT_TARGETS.items():
            parent = getattr(layer, parent_name)
            for name in names:
                patched = PatchedLoraProjection(getattr(parent, name), rank=rank, dtype=torch.float32)
                _randomise(patched.lora_linear_layer, generator, up_std)
                setattr(parent, name, patched)
    prefix = "" if hasattr(text_encoder, "text_model") else "text_model."
    return {prefix + n: p.detach().clone() for n, p in text_encoder.named_parameters() if "lora_linear_layer" in n}


def attach_unet_lora(unet, rank: int, seed: int = 0, up_std: float = 0.1):
    """Adds 0.19-style LoRA outputs to every attention's to_q/k/v/out[0] with random factors.

    Returns:
      (processors: {attn processor name: module holding to_{q,k,v,out}_lora}, hook handles).
    """
    generator = torch.Generator().manual_seed(seed)
    processors, handles = {}, []
    for processor_name in unet.attn_processors:
        attention = unet.get_submodule(processor_name.removesuffix(".processor"))
        layers = torch.nn.Module()
        for linear_name, lora_name in UNET_TARGETS.items():
            linear = attention.get_submodule(linear_name)
            lora = LoRALinearLayer(linear.in_features, linear.out_features, rank=rank)
            _randomise(lora, generator, up_std)
            setattr(layers, lora_name, lora)
            handles.append(linear.register_forward_hook(lambda mod, args, out, lora=lora: out + lora(args[0])))
        processors[processor_name] = layers
    return processors, handles


def unet_lora_state_dict(processors) -> dict[str, torch.Tensor]:
    """The original's unet_lora.pth dict: AttnProcsLayers(unet.attn_processors).state_dict()."""
    return {k: v.detach().clone() for k, v in AttnProcsLayers(processors).state_dict().items()}
