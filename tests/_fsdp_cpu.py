"""Let accelerate run FSDP on CPU processes (gloo), for the FSDP2 tests only.

accelerate 1.15 turns an FSDP config (`ACCELERATE_USE_FSDP=true`, set by `accelerate launch` from a config with
`distributed_type: FSDP`) into `DistributedType.FSDP` only on accelerator devices: `AcceleratorState.__init__`
(accelerate/state.py) switches to FSDP inside `elif self.distributed_type in [MULTI_GPU, MULTI_MLU, MULTI_SDAA,
MULTI_MUSA, MULTI_NPU, MULTI_XPU, MULTI_HPU, MULTI_NEURON]`, so CPU processes (`MULTI_CPU`, gloo) silently drop the
plugin and train with DDP. torch's `fully_shard` itself runs on CPU with gloo. This keeps the FSDP plugin accelerate
built from the launch environment on `MULTI_CPU`; everything after it (the Trainer's FSDP2 paths, accelerate's
`_prepare_fsdp2`, FSDP checkpoint save/load, `clip_grad_norm_`) is the stock code path of a GPU run.
"""

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


def enable_fsdp_on_cpu() -> None:
    """Patch `AcceleratorState.__init__` (idempotent) so that `MULTI_CPU` + an FSDP plugin becomes `FSDP`."""
    if getattr(AcceleratorState.__init__, "_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # as accelerate's own init ends: every later AcceleratorState() copies PartialState's type back
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__
