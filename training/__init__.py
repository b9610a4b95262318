"""Offline side: simulators, and training through the same feature code the agents use."""
