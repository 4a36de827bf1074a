"""serving: many LLMs behind one OpenAI-compatible API (vLLM engines in Ray Serve)."""

__version__ = "0.1.0"
