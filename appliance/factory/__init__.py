"""Specialist factory: train, evaluate, export, quantize, calibrate, publish."""
