"""Imported once by the local engine's forkserver, so that every forked worker starts with
what a task needs already loaded (each would otherwise pay it: seconds per worker)."""

import torch._dynamo  # noqa: F401 - the first torch optimizer imports it lazily (3-5 s)
import torch.optim  # noqa: F401

from ridgeline.study.registry import measurement_kinds
from ridgeline.sweep import task  # noqa: F401

measurement_kinds()  # imports every measurement module once
