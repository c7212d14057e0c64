"""The notebooks share one CI run folder (``LTM_NB_RUN_DIR``): under ``pytest -n`` they run in
one group, one after the other, so neither finds the folder locked by the other's training."""

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.xdist_group("notebooks"))
