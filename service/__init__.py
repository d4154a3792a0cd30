"""normserve service: FastAPI on ONNX Runtime. Never imports torch.

One /classify request: routes/images.py (read, find the version) → tasks.py (decode, run,
top-k) → model.py (the version's own batcher and session); docs/design/request-path.md."""
