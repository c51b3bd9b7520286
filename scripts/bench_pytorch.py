"""PyTorch eager reference for `simfreeze bench`: timm's VisionTransformer of
the same shape (`--impl timm`), or the timm-identical model of
scripts/vit_reference.py (`--impl reference`, for machines without timm),
trained with SGD (momentum 0.9, foreach) on random inputs, the frozen prefix
run under no_grad and detached, like simfreeze does.

Prints one JSON object: {"batch", "threads", "device", "precision", "impl",
"results": [{"frozen", "images_per_sec", "max_memory_mib"}]}.
Timing: `warmup` untimed steps per K, then `rounds` rounds of `steps` steps,
the Ks interleaved, best round per K (the same protocol as simfreeze bench);
on CUDA the device is synchronised around each timed round, and
`max_memory_mib` is torch.cuda.max_memory_allocated over two steps of that K
alone (null on the CPU). `--precision bf16` runs the forward under bf16
autocast, as simfreeze's `train.precision: Bf16`; on CUDA float32 matrix
products use TF32 (set_float32_matmul_precision("high")), as simfreeze's.

`--ddp`, under torchrun: DistributedDataParallel over Gloo (NCCL on CUDA),
each rank on `batch` images, one frozen prefix per process (DDP registers
its hooks on the parameters that train when it is built); the frozen
parameters are left out of DDP as simfreeze leaves them out of the
all-reduce. Rank 0 prints the JSON, with throughput over every rank's
images.
"""
import argparse
import contextlib
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--patch", type=int, default=7)
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frozen", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impl", choices=["timm", "reference"], default="timm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--ddp", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    world, rank = 1, 0
    if a.ddp:
        import torch.distributed as dist
        if len(a.frozen) != 1:
            sys.exit("--ddp takes one --frozen value per process")
        cuda_ddp = a.device.startswith("cuda")
        if cuda_ddp:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            a.device = f"cuda:{local}"
        dist.init_process_group("nccl" if cuda_ddp else "gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("high")
    shape = dict(img_size=a.image_size, patch_size=a.patch, in_chans=a.channels,
                 num_classes=a.classes, embed_dim=a.dim, depth=a.depth, num_heads=a.heads,
                 mlp_ratio=4.0)
    if a.impl == "timm":
        from timm.models.vision_transformer import VisionTransformer
        m = VisionTransformer(**shape, global_pool="token")
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from vit_reference import VisionTransformer
        m = VisionTransformer(**shape)
    m = m.to(dev)
    x = torch.randn(a.batch, a.channels, a.image_size, a.image_size, device=dev)
    y = torch.randint(0, a.classes, (a.batch,), device=dev)

    def autocast():
        if a.precision == "bf16":
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def forward(k):
        if k > 0:
            with torch.no_grad():
                h = m._pos_embed(m.patch_embed(x))
                for b in m.blocks[:k]:
                    h = b(h)
            h = h.detach()
        else:
            h = m._pos_embed(m.patch_embed(x))
        for b in m.blocks[k:]:
            h = b(h)
        return m.forward_head(m.norm(h))

    def trainable(k):
        # Like simfreeze: the embedding goes with block 0; norm and head train.
        frozen = set()
        if k > 0:
            frozen |= {id(p) for p in m.patch_embed.parameters()}
            frozen |= {id(m.cls_token), id(m.pos_embed)}
            for b in m.blocks[:k]:
                frozen |= {id(p) for p in b.parameters()}
        return [p for p in m.parameters() if id(p) not in frozen]

    opts = {k: torch.optim.SGD(trainable(k), lr=1e-4, momentum=0.9) for k in a.frozen}
    step_model = {k: (lambda k=k: forward(k)) for k in a.frozen}
    if a.ddp:
        from torch.nn.parallel import DistributedDataParallel

        class Prefixed(torch.nn.Module):
            """The model with its first k blocks frozen, as DDP's module."""

            def __init__(self, k):
                super().__init__()
                self.m, self.k = m, k

            def forward(self):
                return forward(self.k)

        (k,) = a.frozen
        keep = {id(p) for p in trainable(k)}
        for p in m.parameters():
            p.requires_grad_(id(p) in keep)
        ddp = DistributedDataParallel(Prefixed(k))
        step_model = {k: ddp}

    def run(k, n):
        opt = opts[k]
        for _ in range(n):
            with autocast():
                loss = F.cross_entropy(step_model[k](), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()

    for k in a.frozen:
        run(k, a.warmup)
    best = {k: 0.0 for k in a.frozen}
    for _ in range(a.rounds):
        for k in a.frozen:
            sync()
            t = time.perf_counter()
            run(k, a.steps)
            sync()
            best[k] = max(best[k], world * a.steps * a.batch / (time.perf_counter() - t))
    memory = {k: None for k in a.frozen}
    if cuda:
        for k in a.frozen:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            run(k, 2)
            sync()
            memory[k] = torch.cuda.max_memory_allocated(dev) / 2**20
    if rank == 0:
        print(json.dumps({
            "batch": a.batch, "world": world, "threads": torch.get_num_threads(), "device": str(dev),
            "precision": a.precision, "impl": a.impl,
            "results": [{"frozen": k, "images_per_sec": best[k], "max_memory_mib": memory[k]}
                        for k in a.frozen],
        }))
    if a.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
