"""Container ownership and the Docker socket proxy (issue: ownership service)."""
