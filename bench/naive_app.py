"""The naive baseline `normserve bench` compares against: a first FastAPI + ONNX Runtime service,
as the tutorials write it. One UploadFile route per workload, Pillow, `session.run` at batch 1 on
the event loop, default session options, one uvicorn worker. Not part of normserve."""

import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Response, UploadFile
from PIL import Image

ROOT = Path(os.environ.get("NAIVE_MODEL_REPOSITORY", "model_repository"))


def newest(name: str) -> Path:
    return max((v for v in (ROOT / name).iterdir() if v.name.isdigit()), key=lambda v: int(v.name))


classifier = ort.InferenceSession(str(newest("gncnn") / "model.onnx"), providers=ort.get_available_providers())
denoiser = ort.InferenceSession(str(newest("in_autoencoder") / "model.onnx"), providers=ort.get_available_providers())
labels = json.loads((newest("gncnn") / "config.json").read_text())["labels"]
app = FastAPI()


def load(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img = img.resize(size) if size else img
    return (np.asarray(img, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]


@app.post("/classify")
async def classify(file: UploadFile) -> dict[str, list[dict[str, object]]]:
    logits = classifier.run(["logits"], {"image": load(await file.read(), (32, 32))})[0][0]
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    return {"predictions": [{"label": labels[i], "probability": float(p[i])} for i in np.argsort(-p)[:5]]}


@app.post("/reconstruct")
async def reconstruct(file: UploadFile) -> Response:
    y = denoiser.run(["reconstruction"], {"image": load(await file.read())})[0][0]
    buf = io.BytesIO()
    Image.fromarray((y.transpose(1, 2, 0).clip(0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")
