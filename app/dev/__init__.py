"""Developer tools: the embedded broker, the worker launcher, event generators, fault injection."""
