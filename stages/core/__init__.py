"""The training core: models, devices and process groups, batched transforms, the train and
evaluation loops, the model file format and checkpoints.

It imports only torch, torchvision, safetensors (through `stages.io`), `stages.params` and
`stages.errors`, never dvc, dvclive, typer, matplotlib or scikit-learn, so it runs and is
benchmarked on a bare GPU machine. tests/test_layout.py keeps it so.
"""
