"""The committed stubs are exactly what grpcio-tools generates from protos/."""

from __future__ import annotations

import importlib
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATED = REPO / "protos" / "ds01" / "v1"


def test_committed_stubs_match_the_proto_files(tmp_path: Path):
    subprocess.run(
        [str(REPO / "scripts" / "gen-protos.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": str(REPO / ".venv" / "bin" / "python")},
    )
    fresh = {p.name: p.read_text() for p in (tmp_path / "ds01" / "v1").iterdir()}
    committed = {p.name: p.read_text() for p in GENERATED.glob("*_pb2*")}
    assert fresh.keys() == committed.keys(), "run `make protos` and commit the result"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale stubs {stale}: run `make protos` and commit the result"


def test_protos_follow_buf_conventions():
    """Package ds01.v1; enums start with <ENUM>_UNSPECIFIED = 0; one Request/Response per RPC."""
    for stub in sorted(GENERATED.glob("*_pb2.py")):  # every proto file, new ones too
        module = importlib.import_module(f"ds01.v1.{stub.stem}")
        file = module.DESCRIPTOR
        assert file.package == "ds01.v1"
        for enum in file.enum_types_by_name.values():
            upper = "".join("_" + c if c.isupper() else c for c in enum.name).lstrip("_").upper()
            assert enum.values[0].number == 0
            assert enum.values[0].name == f"{upper}_UNSPECIFIED", enum.name
            assert all(v.name.startswith(upper + "_") for v in enum.values), enum.name
        for service in file.services_by_name.values():
            assert service.name.endswith("Service")
            for method in service.methods:
                assert method.input_type.name == f"{method.name}Request", method.full_name
                assert method.output_type.name == f"{method.name}Response", method.full_name
