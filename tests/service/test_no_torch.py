"""The service runs without torch: a fresh interpreter where importing torch fails imports the
CLI and the app, serves /classify through the real lifespan, and never has torch in sys.modules.

torch is installed in the dev venv (the export extra), so there the block is what keeps it out;
in a runtime-only install the same test holds with torch simply absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import io
    import json
    import sys


    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this test (import of {name!r})")
            return None


    sys.meta_path.insert(0, BlockTorch())

    import normserve.cli  # noqa: E402  (the console entry point, with its export sub-command)
    import normserve.service.app  # noqa: E402

    after_import = "torch" in sys.modules

    from fastapi.testclient import TestClient  # noqa: E402
    from PIL import Image  # noqa: E402

    from normserve.service.settings import Settings  # noqa: E402

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (30, 120, 200)).save(buf, format="PNG")
    settings = Settings(_env_file=None, model_repository=sys.argv[1])
    with TestClient(normserve.service.app.create_app(settings)) as client:
        ready = client.get("/v2/health/ready").status_code
        response = client.post("/classify", files={"file": ("a.png", buf.getvalue(), "image/png")})

    try:
        import torch  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True

    print(json.dumps({
        "torch_after_import": after_import,
        "torch_after_serving": "torch" in sys.modules,
        "block_works": blocked,
        "ready": ready,
        "status": response.status_code,
        "body": response.json(),
    }))
    """
)


def test_service_serves_without_torch(repo_root: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(repo_root / "model_repository")],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["block_works"] is True  # otherwise the test proves nothing
    assert report["torch_after_import"] is False
    assert report["torch_after_serving"] is False
    assert report["ready"] == 200
    assert report["status"] == 200, report["body"]
    assert report["body"]["model"] == "gncnn"
    assert len(report["body"]["predictions"]) == 5
