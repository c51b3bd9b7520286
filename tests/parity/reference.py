"""Reference checkpoints and logits for the weight-import parity tests.

Creates random-weight models with timm and Hugging Face transformers (all
parameters perturbed, so LayerNorm scales and biases are not the trivial
1/0), saves them in the formats simfreeze reads, and the logits each
library computes for one fixed input:

  <out>/cases.json            the cases: model shape, files, logits names
  <out>/tensors.safetensors   inputs and reference logits
  <out>/<case>/...            the checkpoints

The Google .npz checkpoint is written from a timm model by inverting
timm's own `_load_weights`; the script checks that timm loads it back to
the same logits before anything is compared on the Rust side.

Usage: python reference.py OUT_DIR
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import timm
from timm.models.vision_transformer import VisionTransformer, _load_weights, checkpoint_filter_fn

torch.manual_seed(0)
OUT = sys.argv[1]
os.makedirs(OUT, exist_ok=True)
tensors = {}
cases = []


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def timm_vit(img, patch, chans, dim, depth, heads, mlp, classes):
    return perturb(VisionTransformer(
        img_size=img, patch_size=patch, in_chans=chans, embed_dim=dim, depth=depth,
        num_heads=heads, mlp_ratio=mlp, num_classes=classes, qkv_bias=True))


def shape(img, patch, chans, dim, depth, heads, mlp, classes, eps=1e-6):
    return dict(image_size=img, patch=patch, channels=chans, dim=dim, depth=depth,
                heads=heads, mlp_ratio=mlp, classes=classes, norm_eps=eps)


def case(name, file, shp, model_fn, x):
    with torch.no_grad():
        logits = model_fn(x)
    tensors[f"{name}.input"] = x.clone().contiguous()
    tensors[f"{name}.logits"] = logits.contiguous()
    cases.append(dict(name=name, file=file, shape=shp))


# Two timm shapes, saved as timm safetensors.
for name, args in [("timm_a", (32, 8, 3, 48, 2, 3, 4.0, 7)),
                   ("timm_b", (48, 16, 3, 64, 3, 4, 2.0, 5))]:
    m = timm_vit(*args)
    os.makedirs(f"{OUT}/{name}", exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()},
              f"{OUT}/{name}/model.safetensors")
    x = torch.randn(2, args[2], args[0], args[0])
    case(name, f"{name}/model.safetensors", shape(*args), m, x)

    if name == "timm_a":
        # The same checkpoint at 48x48: timm resamples the position
        # embedding (bicubic, antialiased) when it loads it.
        big = VisionTransformer(img_size=48, patch_size=8, in_chans=3, embed_dim=48, depth=2,
                                num_heads=3, mlp_ratio=4.0, num_classes=7, qkv_bias=True).eval()
        big.load_state_dict(checkpoint_filter_fn(m.state_dict(), big))
        case("timm_a_resized", f"{name}/model.safetensors",
             shape(48, 8, 3, 48, 2, 3, 4.0, 7), big, torch.randn(2, 3, 48, 48))

        # Google's .npz layout, from timm's loader read backwards.
        sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
        d, h = 48, 3
        w = {
            "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
            "embedding/bias": sd["patch_embed.proj.bias"],
            "cls": sd["cls_token"],
            "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
            "Transformer/encoder_norm/scale": sd["norm.weight"],
            "Transformer/encoder_norm/bias": sd["norm.bias"],
            "head/kernel": sd["head.weight"].T,
            "head/bias": sd["head.bias"],
        }
        for i in range(2):
            b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
            a = p + "MultiHeadDotProductAttention_1/"
            qkv_w = np.split(sd[b + "attn.qkv.weight"], 3)
            qkv_b = np.split(sd[b + "attn.qkv.bias"], 3)
            for n, wq, bq in zip(("query", "key", "value"), qkv_w, qkv_b):
                w[a + n + "/kernel"] = wq.T.reshape(d, h, d // h)
                w[a + n + "/bias"] = bq.reshape(h, d // h)
            w[a + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(d, h, d // h).transpose(1, 2, 0)
            w[a + "out/bias"] = sd[b + "attn.proj.bias"]
            w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
            w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
            for r in range(2):
                w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
                w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
        np.savez(f"{OUT}/{name}/model.npz", **{k: np.ascontiguousarray(v) for k, v in w.items()})
        back = VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2,
                                 num_heads=3, mlp_ratio=4.0, num_classes=7, qkv_bias=True).eval()
        with torch.no_grad():
            _load_weights(back, f"{OUT}/{name}/model.npz")
            assert torch.allclose(back(x), m(x), atol=1e-6), "npz writer disagrees with timm's loader"
        case("npz_a", f"{name}/model.npz", shape(32, 8, 3, 48, 2, 3, 4.0, 7), back, x)

# Hugging Face ViTForImageClassification (separate q/k/v, eps 1e-12 in
# config.json), written by transformers itself.
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

cfg = ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                image_size=32, patch_size=8, num_channels=3, num_labels=6, layer_norm_eps=1e-12,
                hidden_act="gelu", qkv_bias=True, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
hf = perturb(ViTForImageClassification(cfg))
hf.save_pretrained(f"{OUT}/hf", safe_serialization=True)
x = torch.randn(2, 3, 32, 32)
case("hf", "hf/model.safetensors", shape(32, 8, 3, 64, 3, 4, 4.0, 6, 1e-12),
     lambda t: hf(pixel_values=t).logits, x)


# The model families: timm's own presets at small shapes, against the
# same preset with the same overrides on our side ("model" is a
# simfreeze model section).
def small(preset, img, patch, dim, depth, heads, classes, **ours):
    return dict(preset=preset, image_size=img, patch=patch, dim=dim, depth=depth, heads=heads,
                classes=classes, **ours)


def family(name, timm_name, section, x, timm_kwargs=None, make=None):
    kw = dict(img_size=section["image_size"], patch_size=section["patch"],
              embed_dim=section["dim"], depth=section["depth"], num_heads=section["heads"],
              num_classes=section["classes"])
    kw.update(timm_kwargs or {})
    m = make(**kw) if make else perturb(timm.create_model(timm_name, pretrained=False, **kw))
    os.makedirs(f"{OUT}/{name}", exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{OUT}/{name}/model.safetensors")
    with torch.no_grad():
        logits = m(x)
    tensors[f"{name}.input"] = x.clone().contiguous()
    tensors[f"{name}.logits"] = logits.contiguous()
    cases.append(dict(name=name, file=f"{name}/model.safetensors", model=section))
    return m


x32 = torch.randn(2, 3, 32, 32)
family("deit3", "deit3_base_patch16_224", small("deit3_base_patch16_224", 32, 8, 48, 2, 3, 7), x32)
family("clip", "vit_base_patch16_clip_224", small("vit_base_patch16_clip_224", 32, 8, 48, 2, 3, 7), x32)
family("clip_quickgelu", "vit_base_patch16_clip_quickgelu_224",
       small("vit_base_patch16_clip_quickgelu_224", 32, 8, 48, 2, 3, 7), x32)
# MAE-style fine-tuning: the same ViT-B/16 with average pooling and fc_norm.
family("mae", "vit_base_patch16_224", small("vit_base_patch16_224.mae", 32, 8, 48, 2, 3, 7), x32,
       timm_kwargs=dict(global_pool="avg"))
# No class token (average pooling), no qkv bias.
family("no_cls", None,
       small("vit_tiny_patch16_224", 32, 8, 48, 2, 3, 7, class_token=False, global_pool="avg",
             qkv_bias=False),
       x32, make=lambda **kw: perturb(VisionTransformer(class_token=False, global_pool="avg",
                                                        qkv_bias=False, **kw)))
x28 = torch.randn(2, 3, 28, 28)
family("dinov2", "vit_small_patch14_dinov2", small("vit_small_patch14_dinov2", 28, 14, 24, 2, 2, 5), x28)
# DINOv2 with registers: trained at 70 (a 5x5 grid), loaded at 42 (3x3)
# with the position embedding resampled as timm does (DINOv2 at 224 from
# 518, in small); and the same weights with a dynamic image size, fed 56.
x42 = torch.randn(2, 3, 42, 42)
reg_big = family("reg4_70", "vit_base_patch14_reg4_dinov2",
                 small("vit_base_patch14_reg4_dinov2", 70, 14, 24, 2, 2, 5), torch.randn(2, 3, 70, 70))
reg_small = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=42, patch_size=14,
                              embed_dim=24, depth=2, num_heads=2, num_classes=5).eval()
reg_small.load_state_dict(checkpoint_filter_fn(reg_big.state_dict(), reg_small))
case("reg4_at_42", "reg4_70/model.safetensors", None, reg_small, x42)
cases[-1]["model"] = small("vit_base_patch14_reg4_dinov2", 42, 14, 24, 2, 2, 5)
del cases[-1]["shape"]
reg_dyn = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=70, patch_size=14,
                            embed_dim=24, depth=2, num_heads=2, num_classes=5, dynamic_img_size=True).eval()
reg_dyn.load_state_dict(reg_big.state_dict())
case("reg4_dynamic", "reg4_70/model.safetensors", None, reg_dyn, torch.randn(2, 3, 56, 56))
cases[-1]["model"] = small("vit_base_patch14_reg4_dinov2", 70, 14, 24, 2, 2, 5, dynamic_img_size=True)
del cases[-1]["shape"]

# Hugging Face Dinov2Model (no classifier): its pooled output is the
# class token after the final LayerNorm, the feature our head sees.
from transformers import Dinov2Config, Dinov2Model  # noqa: E402

d2 = perturb(Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=96, image_size=28, patch_size=14,
                                      layer_norm_eps=1e-6)))
d2.save_pretrained(f"{OUT}/hf_dinov2", safe_serialization=True)
with torch.no_grad():
    tensors["hf_dinov2.input"] = x28.clone().contiguous()
    tensors["hf_dinov2.features"] = d2(pixel_values=x28).pooler_output.contiguous()
cases.append(dict(name="hf_dinov2", file="hf_dinov2/model.safetensors",
                  model=small("vit_small_patch14_dinov2", 28, 14, 24, 2, 2, 5)))

save_file(tensors, f"{OUT}/tensors.safetensors")
with open(f"{OUT}/cases.json", "w") as f:
    json.dump(cases, f, indent=1)
print(f"wrote {len(cases)} cases to {OUT} (timm {timm.__version__}, torch {torch.__version__})")
