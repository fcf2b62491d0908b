"""Pydantic job configs and the one Arrow schema of the scoring output."""
