"""Read-only HBM bandwidth ceilings, to set a decode step's bytes against: a grid-stride Triton read-and-sum kernel
at several grid sizes, torch's own sum, and the copy the bench's roofline uses (read + written). 2 GiB of random
bf16, median of 20 runs each; the Triton sums are checked against torch's.

  python scripts/read_bandwidth.py
"""
import torch
import triton
import triton.language as tl

from monokernel.bench.timing import time_steps


@triton.jit
def read_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(pid * BLOCK, n, nprog * BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def median_s(fn) -> float:
    return time_steps(lambda i: fn(), steps=20, warmup=3, device="cuda").median_ms / 1e3


def main():
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    nbytes = x.numel() * x.element_size()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    expect = x.float().sum().item()
    for block in (4096, 8192):
        for per_sm in (2, 4, 8, 16):
            out = torch.empty(sms * per_sm, device="cuda")
            t = median_s(lambda: read_sum[(sms * per_sm,)](x, out, x.numel(), BLOCK=block, num_warps=8))
            got = out.sum().item()
            if abs(got - expect) > 1e-2 * abs(expect) + 100:
                raise RuntimeError(f"read-sum gave {got}, torch {expect}")
            print(f"triton read-sum, block {block}, {per_sm} programs/SM: {nbytes / t / 1e12:.3f} TB/s read", flush=True)
    print(f"torch sum: {nbytes / median_s(lambda: x.sum(dtype=torch.float32)) / 1e12:.3f} TB/s read")
    y = torch.empty_like(x)
    print(f"copy: {2 * nbytes / median_s(lambda: y.copy_(x)) / 1e12:.3f} TB/s read + written")


if __name__ == "__main__":
    main()
