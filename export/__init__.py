"""How it becomes ONNX (and, later, engines): the segment graph, its manifest, the export stage.

``export_model`` (exporter.py) is the entry point; docs/onnx.md describes the graph and the folder.
"""
