"""Serving many streams: the stream pool, the request handler, the Triton Python-backend model, the remote
stream, and the bundled tritonserver's launcher (docs/serving.md)."""
