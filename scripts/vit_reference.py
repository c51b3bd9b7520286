"""A PyTorch eager Vision Transformer written to match timm's plain
`VisionTransformer` exactly (its `Block`, `Attention`, `Mlp`, patch
embedding, class token and position embedding, final norm and head), under
timm's parameter names, without importing timm: the GPU machine that runs
`scripts/gpu-check.sh` has torch but no timm, and `scripts/bench_pytorch.py
--impl reference` trains this model there as PyTorch's side of the
comparison.

`python scripts/vit_reference.py --check` builds timm's model and this one
with the same weights on the CPU and compares their outputs and gradients
(within 1e-5; tests/integration/parity.rs runs it in CI).
"""
import argparse
import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """timm's `Attention` (fused SDPA path, no qk norm, no dropout)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """timm's `Mlp`: fc1, GELU (erf), fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm's pre-norm `Block` (no LayerScale, no drop path)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class PatchEmbed(nn.Module):
    """timm's `PatchEmbed`: a strided convolution, flattened to tokens."""

    def __init__(self, image_size, patch, channels, dim):
        super().__init__()
        self.num_patches = (image_size // patch) ** 2
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """timm's `VisionTransformer` with its defaults (class token, position
    embedding over it, pre-norm blocks, final norm, class-token head).
    The same methods the benchmark calls on timm's model: `_pos_embed`,
    `patch_embed`, `blocks`, `norm`, `forward_head`."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _pos_embed(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def forward_head(self, x):
        return self.head(x[:, 0])

    def forward(self, x):
        x = self._pos_embed(self.patch_embed(x))
        x = self.blocks(x)
        return self.forward_head(self.norm(x))


def check(args):
    """This model against timm's on the same weights: logits and every
    parameter's gradient of a cross-entropy loss, within 1e-5."""
    from timm.models.vision_transformer import VisionTransformer as Timm

    torch.manual_seed(0)
    shape = dict(img_size=args.image_size, patch_size=args.patch, in_chans=args.channels,
                 num_classes=args.classes, embed_dim=args.dim, depth=args.depth,
                 num_heads=args.heads)
    timm_model = Timm(**shape, mlp_ratio=4.0, global_pool="token")
    ours = VisionTransformer(**shape)
    # The same weights: every name timm has, and none more.
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    x = torch.randn(args.batch, args.channels, args.image_size, args.image_size)
    y = torch.randint(0, args.classes, (args.batch,))
    out = {}
    for name, m in (("timm", timm_model), ("reference", ours)):
        m.train()
        logits = m(x)
        F.cross_entropy(logits, y).backward()
        grads = {n: p.grad for n, p in m.named_parameters()}
        out[name] = (logits.detach(), grads)
    logits_diff = (out["timm"][0] - out["reference"][0]).abs().max().item()
    grad_diff = max((out["timm"][1][n] - g).abs().max().item()
                    for n, g in out["reference"][1].items())
    ok = logits_diff <= 1e-5 and grad_diff <= 1e-5
    print(json.dumps({"logits_max_abs_diff": logits_diff, "grad_max_abs_diff": grad_diff,
                      "parameters": len(out["reference"][1]), "ok": ok}))
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare against timm on the CPU")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=48)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    if not a.check:
        ap.print_help()
        return 2
    torch.set_num_threads(1)
    return check(a)


if __name__ == "__main__":
    sys.exit(main())
