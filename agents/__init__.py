"""One thin loop per input stream, plus the dead-letter agent."""
from agents import dead_letters, scoring  # noqa: F401
