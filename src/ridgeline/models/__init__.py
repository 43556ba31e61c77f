"""Reference models: MLPs (standard or NTK parameterisation), a small CNN, a small ResNet,
a small patch transformer."""

from ridgeline.models.cnn import cnn1d
from ridgeline.models.layers import NTKLinear
from ridgeline.models.mlp import mlp
from ridgeline.models.registry import FACTORIES, build_model, check_model, model_factory
from ridgeline.models.resnet import ResNet, resnet
from ridgeline.models.transformer import PatchTransformer, transformer

__all__ = ["mlp", "cnn1d", "resnet", "ResNet", "transformer", "PatchTransformer", "NTKLinear",
           "build_model", "check_model", "model_factory", "FACTORIES"]
