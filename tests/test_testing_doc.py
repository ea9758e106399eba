"""The complete example in docs/testing.md runs, as written, against the real gateway."""

import pathlib
import re

from gateway.testing import GatewayHandle, Publisher

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
