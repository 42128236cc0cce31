"""Names the live test server is started with (a module of its own: importing them
from ``conftest`` would pick up whichever conftest.py was imported first)."""

API_KEY = "test-key"
MODEL_NAME = "tiny-qwen2"
