"""Thin click commands over ci_store and distill; entry point `ci-store`."""
