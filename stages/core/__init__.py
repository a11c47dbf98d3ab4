"""The training core: models, devices and process groups, batched transforms, the train and
evaluation loops, the model file's tensors and checkpoints.

It imports only torch, torchvision, safetensors (through `stages.io`), `stages.params`,
`stages.errors` and `stages.model_file` (the weights' metadata, torch-free), never dvc, dvclive,
typer, matplotlib or scikit-learn, so it runs and is benchmarked on a bare GPU machine.
tests/test_layout.py keeps it so.
"""
