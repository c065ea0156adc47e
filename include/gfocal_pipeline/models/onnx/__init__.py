"""Bring your own ONNX graph: a graph exported by your own recipe (or MMDeploy) plus a small
declaration beside it (`<graph>.spec.yaml`) of its preprocessing and output convention."""
