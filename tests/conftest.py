"""Our suite uses the same fixtures backend teams get from ``gateway.testing`` (pytest11 plugin)."""
