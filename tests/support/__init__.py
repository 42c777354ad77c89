"""Helpers the tests share and that are not tests themselves: record builders, scenarios, special workers."""
