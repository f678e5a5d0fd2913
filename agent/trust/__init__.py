"""trust package."""
