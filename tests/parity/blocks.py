"""Block observations (contract 2) computed by the Python package's
controller, for the trainer-parity test (tests/integration/parity.rs):
random-weight timm and Hugging Face ViTs, one batch of images, and the
per-block pooled tokens and Gram matrices `simfreeze.torch`'s block hooks
hand a policy, on the training forward (the step's batch) and on the
observer's own evaluation forward (the fixed batch).

  <out>/cases.json            the cases: model shape, files
  <out>/tensors.safetensors   inputs, tokens and Gram matrices
  <out>/<case>/...            the checkpoints

Usage: python blocks.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

import timm
from timm.models.vision_transformer import VisionTransformer
from simfreeze._observe import BlockObserver
from simfreeze.torch import find_blocks

torch.manual_seed(0)
OUT = sys.argv[1]
os.makedirs(OUT, exist_ok=True)
tensors = {}
cases = []
ASK = frozenset({"BLOCK_TOKENS", "BLOCK_GRAMS", "FIXED_BATCH"})


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def observe(name, model, x, entry):
    """What the controller's hooks record for `x`: a training forward with
    autograd (the step's batch) and the observer's forward of the fixed batch."""
    obs = BlockObserver(model, find_blocks(model), ASK, fixed_batch=x)
    obs.arm(ASK)
    model.train()
    model(x)
    obs.before_update()
    got = obs.collect()
    obs.remove()
    for key in ("batch_tokens", "batch_grams", "fixed_tokens", "fixed_grams"):
        tensors[f"{name}.{key}"] = got[key].contiguous()
    tensors[f"{name}.input"] = x.clone().contiguous()
    cases.append(dict(name=name, **entry))


# timm's plain ViT (class-token pooling).
m = perturb(VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=3,
                              num_heads=3, mlp_ratio=4.0, num_classes=7, qkv_bias=True))
os.makedirs(f"{OUT}/timm", exist_ok=True)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{OUT}/timm/model.safetensors")
observe("timm", m, torch.randn(6, 3, 32, 32),
        dict(file="timm/model.safetensors",
             shape=dict(image_size=32, patch=8, channels=3, dim=48, depth=3, heads=3,
                        mlp_ratio=4.0, classes=7, norm_eps=1e-6)))

# MAE-style: average pooling of the patch tokens after the class token.
section = dict(preset="vit_base_patch16_224.mae", image_size=32, patch=8, dim=48, depth=2,
               heads=3, classes=7)
m = perturb(timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=48, depth=2, num_heads=3, num_classes=7,
                              global_pool="avg"))
os.makedirs(f"{OUT}/mae", exist_ok=True)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{OUT}/mae/model.safetensors")
observe("mae", m, torch.randn(5, 3, 32, 32), dict(file="mae/model.safetensors", model=section))

# Hugging Face ViTForImageClassification (its layers return tuples or
# tensors, depending on the version).
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

cfg = ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                image_size=32, patch_size=8, num_channels=3, num_labels=6, layer_norm_eps=1e-12,
                hidden_act="gelu", qkv_bias=True, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
hf = perturb(ViTForImageClassification(cfg))
hf.save_pretrained(f"{OUT}/hf", safe_serialization=True)
observe("hf", hf, torch.randn(4, 3, 32, 32),
        dict(file="hf/model.safetensors",
             shape=dict(image_size=32, patch=8, channels=3, dim=64, depth=3, heads=4,
                        mlp_ratio=4.0, classes=6, norm_eps=1e-12)))

save_file(tensors, f"{OUT}/tensors.safetensors")
with open(f"{OUT}/cases.json", "w") as f:
    json.dump(cases, f, indent=1)
