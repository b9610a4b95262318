"""Operator tools: dead-letter replay, the model commands, the effective configuration."""
