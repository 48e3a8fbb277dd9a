"""The checked-in stubs are exactly what the generator makes from proto/ today."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import protogen


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_checked_in_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path / "stubs")
    fresh = _tree(tmp_path / "stubs")
    checked_in = _tree(protogen.STUB_ROOT)

    assert {str(p.relative_to(tmp_path / "stubs")) for p in written} == set(fresh)
    assert sorted(fresh) == sorted(checked_in), "stub files differ; run `python -m appliance.protogen`"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale stubs {stale}; run `python -m appliance.protogen`"


def test_every_proto_is_generated_with_package_imports(tmp_path: Path) -> None:
    protogen.generate(tmp_path / "stubs")
    for proto in protogen.proto_files():
        module = tmp_path / "stubs" / proto.with_name(proto.stem + "_pb2_grpc.py")
        source = module.read_text()
        dotted = ".".join(proto.with_name(proto.stem + "_pb2").parts)
        assert f"from appliance._proto.{dotted.rsplit('.', 1)[0]} import {proto.stem}_pb2" in source


def test_stubs_import_beside_tritonclient() -> None:
    # tritonclient registers its own `inference.*` messages in protobuf's default pool.
    import tritonclient.grpc as triton

    from appliance._proto.appliance.v1 import appliance_pb2
    from appliance._proto.inference import grpc_service_pb2

    ours = grpc_service_pb2.ModelInferRequest(model_name="m", id="7")
    theirs = triton.service_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert (theirs.model_name, theirs.id) == ("m", "7")
    assert appliance_pb2.ClassifyRequest.DESCRIPTOR.full_name == "appliance.v1.ClassifyRequest"


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "__init__.py").write_text("# hand-written\n")
    with pytest.raises(FileExistsError, match="not written by protogen"):
        protogen.generate(target)
    assert (target / "__init__.py").read_text() == "# hand-written\n"
