"""The declared inventory: slots, ids and weights as the seed and DESIGN.md define them."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from ds01.allocator.inventory import DeclaredInventory, InventoryError

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
