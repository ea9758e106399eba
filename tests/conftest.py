"""Our suite uses the same fixtures backend teams get from the ``gateway_testing`` plugin."""

pytest_plugins = ["gateway_testing"]
