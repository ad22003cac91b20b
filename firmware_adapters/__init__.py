"""fedline package."""
