"""The OpenAI-compatible server over the request-level engine: protocol.py (the API schema), loop.py (the engine
thread), app.py (FastAPI routes), server.py (start it: uvicorn in this process or a thread), metrics.py,
chat.py (`monokernel chat`), bench.py (`monokernel bench-serve`), cli.py (the commands' arguments)."""
