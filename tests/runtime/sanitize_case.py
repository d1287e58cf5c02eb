"""A few megakernel steps on a tiny config (or a preset: "preset:NAME"), run under compute-sanitizer by
test_sanitizer_gpu.py; with "abort", first a step that times out on a broken task table (blocks stop with
their weight copies still in flight) and one with a bad token (every block stops at once); the last two
steps sample with top-k and top-p.
By hand, from the repository root: PYTHONPATH=. python tests/runtime/sanitize_case.py [NAME [TUNING [abort]]]."""
import sys
from pathlib import Path

import torch

from monokernel.errors import InputError, KernelRuntimeError
from monokernel.models.load import load_spec
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.mega import MegaDecoder
from monokernel.schedule.abi import TASK_WORDS
from monokernel.schedule.tasks import TASK_FIELDS
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
if len(sys.argv) > 3 and sys.argv[3] == "abort":
    saved = mk.tasks.clone()
    rec = mk.tasks.view(-1, TASK_WORDS)
    waits = torch.nonzero(rec[:, TASK_FIELDS.index("wait_counter")] >= 0)[:, 0]
    rec[waits, TASK_FIELDS.index("wait_count")] += 1000      # every wait: no block gets past its first one
    mk.params.timeout_ns = int(2e9)
    try:
        mk.step(tok, pos)
        raise AssertionError("the broken table did not time out")
    except KernelRuntimeError:
        pass
    mk.tasks.copy_(saved)
    mk.params.timeout_ns = 0
    try:
        mk.step(torch.tensor([4, spec.vocab_size, 6], device="cuda"), pos)
        raise AssertionError("the bad token was not refused")
    except InputError:
        pass
for step in range(3):
    if step == 1:   # the top-k/top-p candidates' shared-memory buffers and merge, a flagged row among them
        mk.set_sampling([1.0, 40.0, 5.0], [1, 2, 3], [5, None, 65], [None, 0.9, 0.5])
    nxt, logits = mk.step(tok, pos)
    expect = ref.forward(tok[:, None], pos, c_ref)[:, 0]
    err = rel_norm(logits, expect)
    assert err < HALF_TOL, err
    tok, pos = expect.argmax(-1), pos + 1
torch.cuda.synchronize()
print("sanitize case ok")
