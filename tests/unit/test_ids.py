import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from browservm.errors import InvalidVmId
from browservm.ids import names_for, new_vm_id, validate_vm_id

VALID_ID = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


@pytest.mark.parametrize("vm_id", ["a", "vm-1", "vm-6d83ddf4-8a5c-4185-b071-4b9c7ca4694b", "x" * 63])
def test_well_formed_ids_are_accepted(vm_id: str) -> None:
    assert validate_vm_id(vm_id) == vm_id


@pytest.mark.parametrize(("vm_id", "reason"), [
    ("", "must not be empty"),
    ("x" * 64, "at most 63"),
    ("../etc", "found './'"),
    ("a/b", "found '/'"),
    ("..", "found '.'"),
    ("vm\n1", "found '\\n'"),
    ("vm 1", "found ' '"),
    ("VM-1", "found 'MV'"),
    ("-vm", "start and end"),
    ("vm-", "start and end"),
    ("vm\x00", "found '\\x00'"),
    ("vmé", "found 'é'"),
])
def test_malformed_ids_are_rejected_with_the_reason(vm_id: str, reason: str) -> None:
    with pytest.raises(InvalidVmId) as excinfo:
        validate_vm_id(vm_id)
    assert excinfo.value.field == "vm_id"
    assert reason in str(excinfo.value)


def test_names_are_rejected_for_a_bad_id_before_anything_is_derived() -> None:
    with pytest.raises(InvalidVmId):
        names_for("../../etc/passwd")


@given(VALID_ID)
def test_derived_names_fit_the_kernel_and_are_stable(vm_id: str) -> None:
    names = names_for(vm_id)
    assert names == names_for(vm_id)
    assert len(names.tap) <= 15
    assert re.fullmatch(r"fc-[a-z2-7]{12}", names.tap)
    assert re.fullmatch(r"02:fc(:[0-9a-f]{2}){4}", names.mac)
    first_octet = int(names.mac[:2], 16)
    assert first_octet & 0b10 and not first_octet & 0b1  # locally administered, unicast
    assert names.hostname == vm_id


def test_ids_sharing_a_long_prefix_get_distinct_taps_and_macs() -> None:
    # A truncation scheme (the old "fc-vm-6d83d") would give all of these one TAP name.
    ids = [f"vm-6d83ddf4-8a5c-4185-b071-4b9c7ca4694{c}" for c in "0123456789abcdef"]
    assert len({names_for(i).tap for i in ids}) == len(ids)
    assert len({names_for(i).mac for i in ids}) == len(ids)


def test_new_ids_are_valid_and_distinct() -> None:
    ids = {new_vm_id() for _ in range(1000)}
    assert len(ids) == 1000
    for vm_id in ids:
        validate_vm_id(vm_id)
