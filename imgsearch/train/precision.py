"""The compute dtype of fine-tuning's training steps (``finetune.train_dtype``).

bfloat16 autocast is used only where the CPU computes bfloat16 natively (AVX512-BF16 or AMX):
elsewhere oneDNN emulates it, slower than float32, so float32 runs and the reason says why.
"""

from __future__ import annotations

import torch


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def train_autocast(train_dtype: str) -> tuple[bool, str]:
    """``(bf16 used, reason)`` for ``finetune.train_dtype``: bfloat16 is used only where the CPU
    computes it natively, else float32 runs and the reason says why."""
    if train_dtype != "bfloat16":
        return False, "train_dtype float32"
    if not native_bf16():
        return False, "bfloat16 asked, but this CPU has no native bfloat16 (float32 runs)"
    return True, "bfloat16 autocast (native on this CPU)"
