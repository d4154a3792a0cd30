"""normserve: a GroupNorm classifier and an InstanceNorm denoiser, exported to ONNX and served on
ONNX Runtime.

Subpackages (each imports only those below it; `tests/packaging/test_layout.py` checks):

* `normserve.contract`, `normserve.safe_pickle`, `normserve.files`, `normserve.quality`: torch-free
  modules that the others share (the model repository's `config.json` schema; a code-free pickle
  reader for data files; which files are images and a file's SHA-256; PSNR).
* `normserve.models`: the PyTorch networks and their training (the `export`/`train` extras).
* `normserve.export`: ONNX export and the model repository writer (imports `models`).
* `normserve.service`: the FastAPI server on ONNX Runtime (never imports torch, `models`,
  `export` or `evaluation`).
* `normserve.evaluation`, `normserve.bench`: measure what the service serves (import `service`).
* `normserve.cli`: the `normserve` command.
"""

__version__ = "0.1.0"
