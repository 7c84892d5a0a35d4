"""Demo megaspec plug-in."""
