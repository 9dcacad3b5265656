"""Built-in recipes, written against the public API only."""
