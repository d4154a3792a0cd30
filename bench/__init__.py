"""`normserve bench`: throughput and latency of normserve against raw ONNX Runtime and a naive
FastAPI baseline, driven by wrk. Runtime dependencies only (torch is optional, for the ORT vs
eager comparison); `normserve[bench]` adds psutil (soak RSS) and matplotlib (the plot)."""
