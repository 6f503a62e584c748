"""Shared pytest configuration: the ``--update-golden`` flag and ``golden`` fixture of the
golden tests (see ``tests/golden.py``)."""
import pytest

from golden import GOLDEN_FOLDER, Golden  # tests/ is on sys.path (pytest's prepend import mode)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the expectation files under tests/golden/ instead of "
                          "comparing with them")


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Golden:
    """Compares rendered text with ``tests/golden/<name>`` (rewrites it with --update-golden)."""
    return Golden(GOLDEN_FOLDER, update=request.config.getoption("--update-golden"))
