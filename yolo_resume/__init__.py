"""yolo-resume: YOLO training whose interrupted runs resume exactly as if nothing happened."""

import os

# Ultralytics must never reach the network (hub checks, font or weight downloads); this has to be
# set before the first `import ultralytics`, which is why it lives at the package root.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402

# `import ultralytics` sets OMP_NUM_THREADS=1 when it is unset, which silently makes every process
# started afterwards (tests, `doctor` replays) train on one thread. Pin torch's own default (one
# thread per core, or the user's setting) first, so the thread count - recorded in checkpoints
# because it can change the last bits of results - does not depend on import order.
USER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")  # None unless the user chose
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

__version__ = "0.2.0"
