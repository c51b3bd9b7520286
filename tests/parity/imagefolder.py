"""An ImageFolder and a Stanford Dogs fixture with a random-weight timm
model and timm's own top-1 on it, for `simfreeze eval`.

  <out>/model.safetensors          timm ViT, 32x32 RGB, patch 8, 3 classes
  <out>/folder/{train,val}/c<k>/   PNG images (ImageFolder)
  <out>/dogs/{train,test}_list.mat Stanford Dogs lists (MATLAB v5, compressed)
  <out>/dogs/Images/...            the same images
  <out>/expected.json              {"top1": ..., "n": ...} computed by timm

PNG keeps the pixels exact, and the images are already 32x32, so the
evaluation transform is the identity and both sides see the same input.

Usage: python imagefolder.py OUT_DIR
"""

import json
import os
import sys

import numpy as np
import scipy.io
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

torch.manual_seed(1)
rng = np.random.default_rng(1)
OUT = sys.argv[1]
N, CLASSES = 30, 3

model = VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2,
                          num_heads=3, num_classes=CLASSES, qkv_bias=True)
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
model.eval()
os.makedirs(OUT, exist_ok=True)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{OUT}/model.safetensors")

pixels = rng.integers(0, 256, size=(N, 32, 32, 3), dtype=np.uint8)
labels = np.arange(N) % CLASSES
files = []
for i in range(N):
    rel = f"c{labels[i]}/img{i:02d}.png"
    files.append(rel)
    for d in ("folder/train", "folder/val", "dogs/Images"):
        os.makedirs(os.path.dirname(f"{OUT}/{d}/{rel}"), exist_ok=True)
        Image.fromarray(pixels[i]).save(f"{OUT}/{d}/{rel}")

file_list = np.empty((N, 1), dtype=object)
for i, f in enumerate(files):
    file_list[i, 0] = f
for split in ("train", "test"):
    scipy.io.savemat(f"{OUT}/dogs/{split}_list.mat",
                     {"file_list": file_list, "labels": (labels + 1).reshape(N, 1).astype(np.float64)},
                     do_compression=True)

x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
x = (x - 0.5) / 0.5
with torch.no_grad():
    pred = model(x).argmax(1).numpy()
# ImageFolder lists class directories, then files, in sorted order: the
# same order as `files` here.
top1 = 100.0 * float((pred == labels).mean())
with open(f"{OUT}/expected.json", "w") as f:
    json.dump({"top1": top1, "n": N}, f)
print(f"timm top-1 {top1:.2f}% on {N} images")
