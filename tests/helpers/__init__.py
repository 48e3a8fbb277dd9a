"""Modules the tests share; conftest files hold only fixtures."""
