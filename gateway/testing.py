"""pytest plugin: fixtures that run the real gateway inside a test suite (entry point ``pytest11``)."""
