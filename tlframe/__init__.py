"""tlframe: transfer learning and domain adaptation on timm backbones with PyTorch Lightning."""

__version__ = "0.1.0"
