"""Stages of the unified TempMe-STOP model: one module per stage."""
