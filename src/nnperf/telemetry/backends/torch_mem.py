"""The PyTorch caching allocator of a cuda, xpu or mps device (names kept from the older logs)."""

from __future__ import annotations

import torch

MB = 1024 * 1024


class TorchMemBackend:
    name = "torch"
    may_hang = False  # reads process counters: it cannot block, so the sampler calls it directly

    def __init__(self, device: torch.device | str):
        device = torch.device(device)
        self.dev = device
        self.device = str(device)
        self.api = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": getattr(torch, "mps", None)}.get(
            device.type)

    @classmethod
    def available(cls, device: torch.device) -> tuple[bool, str]:
        device = torch.device(device)
        if device.type in ("cuda", "xpu"):
            return True, f"torch.{device.type} memory statistics"
        if device.type == "mps":
            return True, "torch.mps.current_allocated_memory"
        return False, "the CPU has no PyTorch device allocator (see proc_rss_mb)"

    def sample(self) -> dict:
        if self.dev.type == "mps":
            return {"torch_mem_alloc_mb": self.api.current_allocated_memory() / MB,
                    "torch_mem_reserved_mb": self.api.driver_allocated_memory() / MB}
        return {"torch_mem_alloc_mb": self.api.memory_allocated(self.dev) / MB,
                "torch_mem_reserved_mb": self.api.memory_reserved(self.dev) / MB,
                "torch_max_mem_alloc_mb": self.api.max_memory_allocated(self.dev) / MB}

    def metrics(self) -> tuple[list[str], dict[str, str]]:
        if self.dev.type == "mps":
            return ["torch_mem_alloc_mb", "torch_mem_reserved_mb"], {
                "torch_max_mem_alloc_mb": "MPS keeps no peak statistic"}
        return ["torch_mem_alloc_mb", "torch_mem_reserved_mb", "torch_max_mem_alloc_mb"], {}

    def close(self) -> None:
        pass
