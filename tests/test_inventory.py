"""The declared inventory: slots, ids and weights as the seed and DESIGN.md define them."""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import pytest

from ds01.allocator.inventory import (
    DeclaredInventory,
    InventoryError,
    NvmlInventory,
    load_inventory,
)
from ds01.core.config import Config, InventoryConfig

REPO = Path(__file__).resolve().parent.parent


def test_shipped_inventory_is_four_gpus_two_in_mig_mode():
    inventory = DeclaredInventory(REPO / "config" / "inventory.yaml").load()
    slots = {s.slot_id: s for s in inventory.slots()}
    assert inventory.simulated and inventory.source == "declared"
    assert [g.mig_enabled for g in inventory.gpus] == [False, False, True, True]
    # A GPU in MIG mode offers only its MIG instances.
    assert sorted(slots) == ["0", "1", "2:1", "2:2", "2:3", "3:1", "3:2"]
    assert slots["0"].gpu_equivalents == 1.0 and slots["0"].mig_profile == ""
    assert Fraction(slots["2:1"].gpu_equivalents).limit_denominator(7) == Fraction(2, 7)
    assert Fraction(slots["3:2"].gpu_equivalents).limit_denominator(7) == Fraction(3, 7)
    assert slots["2:3"].uuid.startswith("MIG-") and slots["2:3"].memory_bytes == 20 * 1024**3
    assert "simulated" in inventory.describe()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpus: 3\n", "expected a mapping with a list under 'gpus'"),
        ("gpus:\n  - {uuid: GPU-1}\n", r"gpus\[0\]: missing key 'index'"),
        ("gpus:\n  - {index: 0, uuid: A}\n  - {index: 0, uuid: B}\n", "an index is declared twice"),
        (
            "gpus:\n  - {index: 0, uuid: A, mig: {instances: [{id: 1, profile: big, uuid: M}]}}\n",
            r"gpus\[0\].mig.instances\[0\]: profile 'big' is not like '2g.20gb'",
        ),
        (
            "gpus:\n  - {index: 0, uuid: A, mig: {slices: 7, instances: "
            "[{id: 1, profile: 8g.80gb, uuid: M}]}}\n",
            "needs 8 of only 7 slices",
        ),
        ("gpus:\n  - {index: 0, uuid: A, memory: lots}\n", r"gpus\[0\]: 'lots' is not a size"),
    ],
)
def test_bad_inventory_files_are_refused_with_the_entry_named(tmp_path, text, message):
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    with pytest.raises(InventoryError, match=message):
        DeclaredInventory(path).load()


def _a100_mig_and_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """An A100 in MIG mode with three 2g.20gb instances, plus a full A100."""
    from tests.fake_pynvml import NVML_DEVICE_MIG_ENABLE, FakeGpu, FakeMig, make_module

    mig_gpu = FakeGpu(
        uuid="GPU-aaaa",
        name="NVIDIA A100-SXM4-80GB",
        memory=80 * 1024**3,
        mig_mode=NVML_DEVICE_MIG_ENABLE,
        migs={
            # NVML's MIG device index is not the GPU instance id.
            0: FakeMig(3, "MIG-0003", "NVIDIA A100-SXM4-80GB MIG 2g.20gb", 2, 19968),
            1: FakeMig(5, "MIG-0005", "NVIDIA A100-SXM4-80GB MIG 2g.20gb", 2, 19968),
            4: FakeMig(1, "MIG-0001", "NVIDIA A100-SXM4-80GB MIG 2g.20gb", 2, 19968),
        },
    )
    full = FakeGpu(uuid="GPU-bbbb", name="NVIDIA A100-SXM4-80GB", memory=80 * 1024**3)
    monkeypatch.setitem(sys.modules, "pynvml", make_module([mig_gpu, full]))


def test_nvml_source_finds_mig_instances_and_full_gpus(monkeypatch):
    _a100_mig_and_full(monkeypatch)
    inventory = NvmlInventory().load()
    assert (inventory.source, inventory.simulated) == ("nvml", False)
    slots = {s.slot_id: s for s in inventory.slots()}
    assert sorted(slots) == ["0:1", "0:3", "0:5", "1"]  # GPU 0 offers only its MIG slices
    assert {s.uuid for s in slots.values()} == {"MIG-0001", "MIG-0003", "MIG-0005", "GPU-bbbb"}
    assert slots["0:3"].uuid == "MIG-0003" and slots["0:3"].mig_profile == "2g.20gb"
    assert Fraction(slots["0:5"].gpu_equivalents).limit_denominator(7) == Fraction(2, 7)
    assert slots["1"].gpu_equivalents == 1.0 and slots["1"].memory_bytes == 80 * 1024**3
    assert "simulated" not in inventory.describe()


def test_auto_source_uses_nvml_when_a_driver_answers(monkeypatch, tmp_path):
    _a100_mig_and_full(monkeypatch)
    config = Config(inventory=InventoryConfig(source="auto", file=tmp_path / "none.yaml"))
    assert load_inventory(config).source == "nvml"


def test_auto_source_falls_back_to_the_declared_file_without_a_driver(monkeypatch):
    from tests.fake_pynvml import make_module

    monkeypatch.setitem(sys.modules, "pynvml", make_module([], driver_loaded=False))
    config = Config(
        inventory=InventoryConfig(source="auto", file=REPO / "config" / "inventory.yaml")
    )
    assert load_inventory(config).simulated
    with pytest.raises(InventoryError, match="NVML is not available"):
        load_inventory(Config(inventory=InventoryConfig(source="nvml")))
