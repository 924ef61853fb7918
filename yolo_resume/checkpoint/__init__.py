"""Checkpoints: atomic, verified, pickle-free folders (see `yolo_resume.checkpoint.format`)."""

from yolo_resume.checkpoint.format import *  # noqa: F403  (the public API is format.__all__)
from yolo_resume.checkpoint.format import __all__  # noqa: F401
