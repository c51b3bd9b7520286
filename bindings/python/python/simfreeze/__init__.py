"""simfreeze's freezing policies inside PyTorch training loops.

The same compiled policy plugins (`.so`) as the `simfreeze` trainer, loaded
by the same runtime and held to the same freezing contract:

- `Policy`: load a plugin and hand it steps; it returns checked `Decision`s.
- `simfreeze.torch.FreezeController`: applies them to a timm or Hugging
  Face ViT in your own loop (frozen blocks stop computing gradients and are
  never updated again).
- `simfreeze.lightning.FreezeCallback`, `simfreeze.hf.FreezeCallback`: the
  same for Lightning's and Hugging Face's `Trainer`.

Docs: docs/python.md in the simfreeze repository.
"""

from ._native import (
    ABI_VERSION,
    ContractViolation,
    PluginLoadError,
    PolicyError,
    PolicyFailed,
    PolicyPanicked,
    __version__,
)
from ._policy import (
    PLUGIN_DIR,
    PLUGIN_PATH_VAR,
    Decision,
    Policy,
    available,
    matches,
    read_observations,
    replay,
    search_path,
)

__all__ = [
    "ABI_VERSION",
    "ContractViolation",
    "Decision",
    "PLUGIN_DIR",
    "PLUGIN_PATH_VAR",
    "PluginLoadError",
    "Policy",
    "PolicyError",
    "PolicyFailed",
    "PolicyPanicked",
    "available",
    "matches",
    "read_observations",
    "replay",
    "search_path",
]
