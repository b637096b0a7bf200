"""Container orchestration with MLC conventions (issue: containers service)."""
