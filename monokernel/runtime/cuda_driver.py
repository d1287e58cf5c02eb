"""Thin layer over cuda-python's driver API: load a cubin into the context PyTorch uses and launch
a kernel whose only parameter is a struct, as a cooperative grid on a given stream."""
from __future__ import annotations

import ctypes

import torch

from ..errors import KernelRuntimeError, MonokernelError


def _driver():
    try:
        from cuda.bindings import driver          # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as driver       # older cuda-python
        except ImportError:
            raise MonokernelError("the megakernel needs cuda-python: pip install 'cuda-python>=12.4'") from None
    return driver


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise KernelRuntimeError(f"{what} failed: {err!r}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


class LoadedKernel:
    def __init__(self, cubin: bytes, name: str, smem_bytes: int, threads: int, device: torch.device):
        self.drv = _driver()
        torch.cuda.init()
        torch.zeros(1, device=device)               # makes PyTorch's primary context current
        _check(self.drv.cuInit(0), "cuInit")
        ctx = _check(self.drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if not int(ctx):
            dev = _check(self.drv.cuDeviceGet(device.index or 0), "cuDeviceGet")
            ctx = _check(self.drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            _check(self.drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self.module = _check(self.drv.cuModuleLoadData(cubin), "cuModuleLoadData")
        self.func = _check(self.drv.cuModuleGetFunction(self.module, name.encode()), "cuModuleGetFunction")
        attr = self.drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        _check(self.drv.cuFuncSetAttribute(self.func, attr, smem_bytes), "cuFuncSetAttribute(shared memory)")
        self.smem_bytes, self.threads = smem_bytes, threads
        self.cooperative = True    # False only to measure what the cooperative launch costs (a plain launch)
        self.blocks_per_sm = _check(self.drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            self.func, threads, smem_bytes), "cuOccupancyMaxActiveBlocksPerMultiprocessor")

    def launch(self, grid: int, params: ctypes.Structure, stream: torch.cuda.Stream) -> None:
        """A cooperative launch: the driver starts the grid only with every block resident at once (the
        blocks wait on each other's counters, so a block left waiting for an SM would spin the others into
        their timeout), and refuses at once a grid that cannot be, e.g. with SMs taken by MPS limits."""
        args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        if not self.cooperative:
            _check(self.drv.cuLaunchKernel(self.func, grid, 1, 1, self.threads, 1, 1, self.smem_bytes,
                                           self.drv.CUstream(stream.cuda_stream), ctypes.addressof(args), 0),
                   "cuLaunchKernel")
            return
        err, = self.drv.cuLaunchCooperativeKernel(self.func, grid, 1, 1, self.threads, 1, 1, self.smem_bytes,
                                                  self.drv.CUstream(stream.cuda_stream), ctypes.addressof(args))
        if int(err) == int(self.drv.CUresult.CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE):
            raise KernelRuntimeError(
                f"the megakernel's {grid} blocks cannot all be resident on this GPU at once ({self.blocks_per_sm} "
                f"per SM fit, {self.threads} threads and {self.smem_bytes} B of shared memory each): fewer SMs "
                "are available than the device reports (MPS or green-context limits?); run without them")
        _check((err,), "cuLaunchCooperativeKernel")
