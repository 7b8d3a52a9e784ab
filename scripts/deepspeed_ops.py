"""Build DeepSpeed's JIT-compiled CPU collectives (deepspeed_shm_comm) once, for bootstrap.sh.

Prints one line: ``built PATH`` (the compiled op), or ``none ACCELERATOR`` where DeepSpeed's
accelerator has no such op (CUDA: its collectives are NCCL's and nothing is compiled here).
Exits 1 only when a build fails.
"""

import logging
import sys

logging.disable(logging.WARNING)  # "Setting accelerator to CPU", printed on every import
from deepspeed.accelerator import get_accelerator  # noqa: E402

accelerator = get_accelerator()
builder = accelerator.create_op_builder("ShareMemCommBuilder")
if builder is None:
    print(f"none {accelerator.device_name()}")
    sys.exit(0)
print(f"built {builder.load(verbose=False).__file__}")
