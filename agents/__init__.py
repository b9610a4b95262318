"""One thin loop per input stream, plus the dead-letter agent; `app/main.py` registers them."""
