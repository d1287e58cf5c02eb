"""A few megakernel steps on a tiny config (or a preset: "preset:NAME"), run under compute-sanitizer by
test_sanitizer_gpu.py.
By hand, from the repository root: PYTHONPATH=. python tests/runtime/sanitize_case.py [NAME [TUNING]]."""
import sys
from pathlib import Path

import torch

from monokernel.models.load import load_spec
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.mega import MegaDecoder
from monokernel.schedule.tuning import Tuning

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/, for conftest.py when run by hand
from conftest import HALF_TOL, TINY_SPECS, prefilled, rel_norm

name = sys.argv[1] if len(sys.argv) > 1 else "qwen3"
spec = TINY_SPECS[name] if name in TINY_SPECS else load_spec(name)
tuning = Tuning.parse(sys.argv[2] if len(sys.argv) > 2 else "")
w = random_weights(spec, torch.bfloat16, "cuda", seed=11)
ref = ReferenceModel(w)
c_ref, c_mk = prefilled(ref, 3, 64, [3, 17, 40], torch.Generator().manual_seed(2))
mk = MegaDecoder(w, c_mk, timeout_s=0, tuning=tuning)     # no timeout: the sanitizer slows every wait down
tok, pos = torch.tensor([4, 5, 6], device="cuda"), torch.tensor([3, 17, 40], device="cuda")
for _ in range(3):
    nxt, logits = mk.step(tok, pos)
    expect = ref.forward(tok[:, None], pos, c_ref)[:, 0]
    err = rel_norm(logits, expect)
    assert err < HALF_TOL, err
    tok, pos = expect.argmax(-1), pos + 1
torch.cuda.synchronize()
print("sanitize case ok")
