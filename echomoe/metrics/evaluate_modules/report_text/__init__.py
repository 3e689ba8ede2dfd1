"""Package marker so the evaluate module script ships with echomoe (see parent)."""
