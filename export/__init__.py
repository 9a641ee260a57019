"""How the model becomes ONNX graphs and TensorRT engines."""
