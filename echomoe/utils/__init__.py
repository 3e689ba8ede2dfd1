"""Small shared utilities (benchmark timing, ...)."""
