"""HTTP handlers: thin functions that authenticate, validate, call routing and render."""
