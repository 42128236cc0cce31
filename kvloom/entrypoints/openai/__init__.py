"""The OpenAI-compatible HTTP server (``kvloom serve``): see docs/serving.md."""
