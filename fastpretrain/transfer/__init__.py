"""Transfer: pretrained weights in (``weights``: our checkpoints, torchvision, timm and WSL-Images state dicts,
safetensors), exported weights out (``export``: files that torchvision, safetensors and onnxruntime load without
fastpretrain)."""
