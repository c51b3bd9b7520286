"""Reference values for the on-demand observations (contract 2).

Two random-weight timm ViTs (a class-token model, and an average-pooling
model with two register tokens and no class token), the per-block outputs
of one fixed batch read with forward hooks on `model.blocks[i]`, and from
them, in float64 numpy:

  tokens   the token the head would pool: the class token, or the mean of
           the patch tokens (registers excluded), per block
  grams    G = A A^T of the flattened block output A (B x T*D), each row
           divided by its L2 norm (Tung & Mori's similarity matrix)
  sp       SP loss ||G_0 - G_1||_F^2 / B^2 of blocks 0 and 1
  cka      linear CKA of blocks 0 and 2's tokens (columns centred)

  <out>/cases.json           shapes, files and the scalar references
  <out>/tensors.safetensors  inputs, tokens and grams per case
  <out>/<case>.safetensors   the checkpoints

Usage: python observations.py OUT_DIR
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

torch.manual_seed(0)
OUT = sys.argv[1]
os.makedirs(OUT, exist_ok=True)
tensors, cases = {}, []


def gram(a):
    a = a.reshape(a.shape[0], -1)
    g = a @ a.T
    n = np.sqrt((g * g).sum(axis=1, keepdims=True))
    return np.where(n > 0, g / np.where(n > 0, n, 1.0), 0.0)


def cka(x, y):
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    hsic = lambda p, q: np.linalg.norm(q.T @ p) ** 2
    return hsic(x, y) / np.sqrt(hsic(x, x) * hsic(y, y))


def case(name, model, shape, prefix, pool):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().double().numpy()))
             for b in model.blocks]
    x = torch.randn(5, 3, shape["image_size"], shape["image_size"])
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    tokens = [h[:, prefix:].mean(axis=1) if pool == "avg" else h[:, 0] for h in outs]
    grams = [gram(h) for h in outs]
    b = x.shape[0]
    sp = float(((grams[0] - grams[1]) ** 2).sum() / b**2)
    tensors[f"{name}.input"] = x.contiguous()
    tensors[f"{name}.tokens"] = torch.tensor(np.stack(tokens)).float().contiguous()
    tensors[f"{name}.grams"] = torch.tensor(np.stack(grams)).float().contiguous()
    file = f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(OUT, file))
    cases.append(dict(name=name, file=file, shape=shape, sp_loss_0_1=sp,
                      cka_0_2=float(cka(tokens[0], tokens[2]))))


base = dict(image_size=16, patch=4, channels=3, dim=24, depth=3, heads=3, mlp_ratio=2.0,
            classes=7, norm_eps=1e-6)
case("cls", VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=3,
                              mlp_ratio=2.0, num_classes=7, qkv_bias=True),
     base, 1, "token")
case("avg_reg", VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=3,
                                  mlp_ratio=2.0, num_classes=7, qkv_bias=True, class_token=False,
                                  global_pool="avg", reg_tokens=2, no_embed_class=True),
     dict(base, class_token=False, global_pool="avg", reg_tokens=2, no_embed_class=True), 2, "avg")
save_file(tensors, os.path.join(OUT, "tensors.safetensors"))
with open(os.path.join(OUT, "cases.json"), "w") as f:
    json.dump(cases, f, indent=1)
