"""Workflows: definitions (spec), their store, validation against the model store, and the runner."""
