"""Network parts shared by model adapters (ResNet, FPN, conv layers, Ascend's NMS op, level sizes).

Nothing here is a fact of one model: adapters under `gfocal_pipeline.models` build from these.
"""
