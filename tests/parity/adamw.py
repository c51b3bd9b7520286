"""Reference for the AdamW parity test: timm's layer-wise decay groups and
torch.optim.AdamW (fused) over several steps.

Two small timm ViTs (LayerScale, registers, norm_pre; and one without class
token, average pooled with fc_norm) give, per parameter, the learning-rate
scale and weight decay of `param_groups_layer_decay` (layer decay 0.75,
the model's `no_weight_decay`). The first is then updated by
torch.optim.AdamW(fused=True) for 5 steps with given gradients, a
learning rate per step, per-block factors (as a policy sets them) and the
first blocks frozen from step 2 on (no gradient: PyTorch skips the
parameter and leaves its state alone):

  <out>/adamw.json           shapes, per-step lr / factors / frozen, groups
  <out>/adamw.safetensors    init.<p>, grad.<s>.<p>, after.<s>.<p>

Usage: python adamw.py OUT_DIR
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from timm.optim._param_groups import param_groups_layer_decay

torch.manual_seed(0)
OUT = sys.argv[1]
os.makedirs(OUT, exist_ok=True)
DECAY, WD, STEPS = 0.75, 0.05, 5

shapes = {
    "a": dict(image_size=16, channels=3, patch=4, dim=12, depth=3, heads=3, mlp_ratio=2.0,
              classes=5, init_values=1e-5, reg_tokens=2, no_embed_class=True, pre_norm=True),
    "b": dict(image_size=16, channels=3, patch=4, dim=12, depth=3, heads=3, mlp_ratio=2.0,
              classes=5, class_token=False, global_pool="avg"),
}


def build(s):
    kw = dict(img_size=s["image_size"], in_chans=s["channels"], patch_size=s["patch"],
              embed_dim=s["dim"], depth=s["depth"], num_heads=s["heads"], mlp_ratio=s["mlp_ratio"],
              num_classes=s["classes"])
    for k in ("init_values", "reg_tokens", "no_embed_class", "pre_norm", "class_token", "global_pool"):
        if k in s:
            kw[k] = s[k]
    return VisionTransformer(**kw)


def groups_of(m):
    """name -> (lr_scale, weight_decay), as timm's optimizer factory makes them."""
    out = {}
    names = {id(p): n for n, p in m.named_parameters()}
    for g in param_groups_layer_decay(m, weight_decay=WD, no_weight_decay_list=m.no_weight_decay(),
                                      layer_decay=DECAY):
        for p in g["params"]:
            out[names[id(p)]] = (g["lr_scale"], g["weight_decay"])
    return out


def block_of(name):
    if name.startswith("blocks."):
        return int(name.split(".")[1])
    if name.split(".")[0] in ("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre"):
        return 0
    return None  # the head's group: never frozen, factor 1


models = {k: build(s) for k, s in shapes.items()}
settings = {k: groups_of(m) for k, m in models.items()}

m = models["a"]
named = list(m.named_parameters())
tensors = {f"init.{n}": p.detach().clone() for n, p in named}
lrs = [1e-2, 8e-3, 6e-3, 4e-3, 2e-3]
factors = [[1.0, 1.0, 1.0], [0.5, 2.0, 1.0], [0.25, 0.5, 2.0], [1.0, 0.5, 0.25], [2.0, 1.0, 0.5]]
frozen = [0, 0, 1, 2, 2]
param_groups = [dict(params=[p], name=n, lr_scale=settings["a"][n][0], weight_decay=settings["a"][n][1])
                for n, p in named]
opt = torch.optim.AdamW(param_groups, lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, fused=True)
for s in range(STEPS):
    for g in opt.param_groups:
        b = block_of(g["name"])
        g["lr"] = lrs[s] * g["lr_scale"] * (factors[s][b] if b is not None else 1.0)
    for n, p in named:
        b = block_of(n)
        if b is not None and b < frozen[s]:
            p.grad = None
        else:
            p.grad = torch.randn_like(p)
            tensors[f"grad.{s}.{n}"] = p.grad.clone()
    opt.step()
    for n, p in named:
        tensors[f"after.{s}.{n}"] = p.detach().clone()

save_file({k: v.contiguous() for k, v in tensors.items()}, f"{OUT}/adamw.safetensors")
with open(f"{OUT}/adamw.json", "w") as f:
    json.dump(dict(shapes=shapes, lrs=lrs, factors=factors, frozen=frozen, layer_decay=DECAY,
                   weight_decay=WD, settings=settings), f, indent=1)
print(f"wrote {STEPS} AdamW steps to {OUT}")
