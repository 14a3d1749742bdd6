"""Export toolchain: integer graph -> ONNX -> onnx2tf -> int8 TFLite with our own parameters -> parity."""
