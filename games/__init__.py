"""Built-in games. Each registers through the `arena` entry-point group exactly as a third-party game does."""
