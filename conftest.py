"""Fixtures shared by the test suites of several trees."""

pytest_plugins = ("common.tests.llama_fixtures", "common.tests.margins", "common.tests.bad_inputs")
