"""`serve` with speculation (reference engine): concurrent requests through the real openai client get the
text of plain greedy decoding, in fewer engine steps than tokens; sampled requests stay reproducible by seed."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("uvicorn")   # the serve extra; absent on a bare GPU machine
openai = pytest.importorskip("openai")

from monokernel.serve.server import ServeOptions, ServerThread

from servehelp import load_default_engine


PROMPTS = ["List: red, green, blue, red, green, blue, red,", "def add(a, b):\n    return a + b\n\ndef add("]


def test_speculative_server():
    engine = load_default_engine()
    want = [g.text for g in engine.generate(PROMPTS, max_new_tokens=8)]
    with ServerThread(engine, ServeOptions(max_batch=2, speculative="ngram", draft_tokens=4)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def complete(prompt, **kw):
            return client.completions.create(model=engine.name, prompt=prompt, max_tokens=8, **kw).choices[0].text

        steps0 = srv.loop.call(lambda s: s.stats.decode_steps).result(10)
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda p: complete(p, temperature=0), PROMPTS))
        assert got == want
        steps = srv.loop.call(lambda s: s.stats.decode_steps).result(10) - steps0
        assert steps < 2 * 7     # several tokens a step where prompt lookup hits
        a, b = (complete(PROMPTS[0], temperature=1.0, seed=4) for _ in range(2))
        assert a == b
