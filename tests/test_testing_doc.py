"""The complete example in docs/testing.md runs, as written, against the real gateway."""

import importlib.metadata
import pathlib
import re

from gateway_testing import GatewayHandle, Publisher

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "testing.md"


def _example() -> dict[str, object]:
    code = re.search(r"```python\n(# tests/test_kitchen_flow.py\n.*?)```", DOC.read_text(), re.S)
    assert code is not None, "docs/testing.md lost its complete example"
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), str(DOC), "exec"), namespace)
    return namespace


async def test_doc_example_round_flow(gateway: GatewayHandle, publisher: Publisher) -> None:
    await _example()["test_ready_round_reaches_the_table_and_the_waiter"](gateway, publisher)  # type: ignore[operator]


async def test_doc_example_bad_token(gateway: GatewayHandle) -> None:
    await _example()["test_a_bad_token_is_refused_with_4001"](gateway)  # type: ignore[operator]


def test_doc_enables_the_plugin_the_way_this_suite_does() -> None:
    shown = re.search(r"```python\n# tests/conftest.py\n(.*?)```", DOC.read_text(), re.S)
    assert shown is not None, "docs/testing.md lost its conftest example"
    conftest = (DOC.parent.parent / "tests" / "conftest.py").read_text()
    assert shown.group(1).strip() in conftest


def test_the_plugin_is_opt_in() -> None:
    # No pytest11 entry point: installing gateway[testing] adds no fixture to other suites.
    plugins = importlib.metadata.entry_points(group="pytest11")
    assert not [ep for ep in plugins if ep.value.split(":")[0].startswith(("gateway", "gateway_testing"))]
