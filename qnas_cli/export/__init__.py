"""Export toolchain: IntegerGraph -> float ONNX -> onnx2tf -> fully int8 TFLite with our
parameters -> parity report. Heavy dependencies (onnx, LiteRT, onnx2tf in a subprocess) are
imported by the submodules that use them, not here.

    from qnas_cli.export.tflite import export_tflite      # one call for the CLI
    from qnas_cli.export.verify import verify_tflite, failures
"""
