"""Models: loading and scoring (scorer), the versions on disk (registry)."""
