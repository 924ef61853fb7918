"""yolo-resume: YOLO training whose interrupted runs resume exactly as if nothing happened."""

import os

# Ultralytics must never reach the network (hub checks, font or weight downloads); this has to be
# set before the first `import ultralytics`, which is why it lives at the package root.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

__version__ = "0.1.0"
