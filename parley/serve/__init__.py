"""Parley's HTTP server (OpenAI-compatible API + Parley's routes): see `parley.serve.app`."""
