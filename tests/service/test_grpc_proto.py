"""The committed descriptor set is what protoc makes of the committed .proto files, and those
.proto files describe the same messages and RPCs as the ones tritonclient was built from (same
names, field numbers, types and labels: wire-compatible), so the unmodified client works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.model_config_pb2 as triton_model_config
import tritonclient.grpc.service_pb2 as triton_service
from google.protobuf import descriptor_pb2

from normserve.service.grpc_server import DESCRIPTOR_SET, PROTO_DIR, PROTO_FILES, infer_response, message_class
from normserve.service.v2_protocol import OutputTensor, RequestOutput

REGENERATE = (
    f"{sys.executable} -m grpc_tools.protoc -I{PROTO_DIR} --include_imports "
    f"--descriptor_set_out={DESCRIPTOR_SET} {PROTO_FILES[0]}"
)


def _generate(out: Path) -> bytes:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            PROTO_FILES[0],
        ],
        check=True,
    )
    return out.read_bytes()


def test_descriptor_set_is_regenerated_from_the_protos(tmp_path: Path) -> None:
    assert _generate(tmp_path / "inference.binpb") == DESCRIPTOR_SET.read_bytes(), (
        f"service/protos changed: regenerate with\n  {REGENERATE}"
    )


def test_proto_files_keep_nvidias_licence() -> None:
    for name in PROTO_FILES:
        head = (PROTO_DIR / name).read_text()[:2000]
        assert "NVIDIA CORPORATION" in head and "Redistribution and use in source and binary forms" in head


def _shape(fp: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    """Every message's fields and every service's methods, as the wire sees them."""
    out: dict[str, object] = {}

    def walk(prefix: str, messages: list[descriptor_pb2.DescriptorProto]) -> None:
        for m in messages:
            name = prefix + m.name
            out[name] = sorted(
                (f.name, f.number, f.type, f.label, f.type_name, f.oneof_index if f.HasField("oneof_index") else -1)
                for f in m.field
            )
            walk(name + ".", list(m.nested_type))

    walk("", list(fp.message_type))
    for e in fp.enum_type:
        out[f"enum {e.name}"] = sorted((v.name, v.number) for v in e.value)
    for s in fp.service:
        out[f"service {s.name}"] = [
            (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in s.method
        ]
    return out


@pytest.mark.parametrize(
    ("name", "module"), [("grpc_service.proto", triton_service), ("model_config.proto", triton_model_config)]
)
def test_messages_match_tritonclients(name: str, module: object) -> None:
    ours = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file}[name]
    theirs = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(theirs)  # type: ignore[attr-defined]
    assert ours.package == theirs.package == "inference"
    assert _shape(ours) == _shape(theirs)


OUTPUT_SETS = {
    "no outputs": [],
    "logits": [("logits", (1, 10))],
    "feature maps": [("p3", (2, 32, 48, 48)), ("p4", (2, 64, 24, 24)), ("logits", (2, 10))],
    "a 16 KiB output (2-byte length)": [("x", (1, 4096))],
    "BYTES (classification)": [("logits", None)],
}


@pytest.mark.parametrize("outputs", list(OUTPUT_SETS.values()), ids=list(OUTPUT_SETS))
def test_an_infer_response_is_the_bytes_protobuf_writes(outputs: list[tuple[str, tuple[int, ...] | None]]) -> None:
    """`infer_response` appends the raw contents itself, copied with the GIL released: the bytes
    are those protobuf's own serialisation gives, and tritonclient's message reads them back."""
    rng = np.random.default_rng(0)
    tensors = []
    for name, shape in outputs:
        if shape is None:
            value = np.array([b"0.9:3:cat", b"0.05:5:dog"], dtype=object)
            datatype = "BYTES"
        else:
            value = rng.standard_normal(shape, dtype=np.float32)
            datatype = "FP32"
        tensors.append(OutputTensor(RequestOutput(name=name), datatype, value))
    wire = infer_response("gncnn", "8", "req-1", tensors)
    # what Triton sends: little-endian float32 rows; BYTES as 4-byte lengths before each string
    raw = {
        t.name: b"".join(len(v).to_bytes(4, "little") + v for v in t.value)
        if t.datatype == "BYTES"
        else t.value.astype("<f4").tobytes()
        for t in tensors
    }

    expected = message_class("ModelInferResponse")(model_name="gncnn", model_version="8", id="req-1")
    for t in tensors:
        expected.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.value.shape))
        expected.raw_output_contents.append(raw[t.name])
    assert wire == expected.SerializeToString()
    parsed = triton_service.ModelInferResponse.FromString(wire)
    assert [o.name for o in parsed.outputs] == [name for name, _ in outputs]
    assert list(parsed.raw_output_contents) == [raw[t.name] for t in tensors]
