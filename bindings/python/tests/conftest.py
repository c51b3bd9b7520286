"""Shared helpers of the Python package's tests: the repository's paths,
the test-fixture plugins (built here with cargo, as the Rust tests build
them), tiny timm and Hugging Face ViTs, synthetic data."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
RELEASE = REPO / "target" / "release"
EXTERNAL = REPO / "target" / "external" / "release"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The directory of the fixture plugins (misbehaving, abi_v1, ...)."""
    env = dict(os.environ, CARGO_TARGET_DIR=str(REPO / "target" / "external"))
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--manifest-path",
         str(REPO / "tests" / "fixtures" / "Cargo.toml")],
        check=True, env=env,
    )
    return EXTERNAL


@pytest.fixture(scope="session")
def simfreeze_bin() -> Path:
    path = RELEASE / "simfreeze"
    assert path.is_file(), f"{path} is missing: run scripts/setup.sh"
    return path


def tiny_timm(depth: int = 3, classes: int = 4, seed: int = 0):
    """A tiny timm VisionTransformer (16x16 inputs, 4x4 patches, width 24)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4,
        embed_dim=24, depth=depth, num_heads=2, num_classes=classes,
    )


def synthetic(n: int = 64, classes: int = 4, seed: int = 0):
    """Images whose class shows in their mean brightness, and labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5 + (y.float() / classes)[:, None, None, None]
    return x, y


def snapshot(params) -> list:
    return [p.detach().clone() for p in params]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))
