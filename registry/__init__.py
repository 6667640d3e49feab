"""Not written yet: see the README status."""
