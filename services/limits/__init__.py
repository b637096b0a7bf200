"""Limits resolution: who may use what (issue: limits service)."""
