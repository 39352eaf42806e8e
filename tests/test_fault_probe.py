"""The fast cases of the fault probe (tests/fault_probe.py), one test each: the command line with bad
input and faults, as subprocesses; ``python tests/fault_probe.py`` runs them all and prints a tally."""
import pytest

from . import fault_probe

FAST = [name for name, (_, fast, _) in fault_probe.CASES.items() if fast]


@pytest.mark.parametrize("name", FAST)
def test_fault_probe_case(name, tmp_path):
    try:
        fault_probe.run_case(name, tmp_path)
    except fault_probe.Skip as skip:
        pytest.skip(str(skip))
