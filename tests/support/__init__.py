"""Helpers that start and watch real processes for the integration tests."""
