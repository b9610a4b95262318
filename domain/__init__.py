"""The domain: each pipeline's state per key and its features, as pure functions (state in, state
out). Nothing here imports the app, Faust or Kafka; training and the workers call the same functions."""
