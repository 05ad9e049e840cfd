"""mabn."""
