"""After training: a trained model out of its checkpoint, into ONNX, and asked about images.

What export.py and predict.py share:

- `weights.py`: a checkpoint (model_best.pth, EMA weights when it has them) or a `--pretrained`
  file -> the network in eval mode with its class names and input size; BatchNorm folding.
- `images.py`: image files -> the loaders' val preprocessing (the same resize and center crop), one
  bad file reported by name without stopping the rest.
- `onnx_model.py`: export with a dynamic batch axis and the preprocessing in the metadata, read it
  back, run it with onnxruntime, compare logits, time it.

onnx and onnxruntime load only inside the functions that use them.
"""
