"""Decoded training images in memory shared by every data-loader worker of one dataset.

With windowed mosaic partners (`augment.mosaic_window`), an item's four tiles come from the images at the
positions of its window of the epoch's sample order, and the batches of one window are spread over the
workers (the DataLoader hands batch k to worker k % workers). A per-worker cache would decode most images
of a window once in every worker; this cache decodes each about once in all: the worker that needs an
image first decodes it into the image's slot, the others read it from there.

Layout: `slots` fixed-size slots of pixels, and a header row per slot (version, index + 1, height, width).
The slot of an image is its position in the epoch order modulo `slots`; two windows' worth of slots
means the images of neighbouring windows never share one. An image's pixels depend only on its file
and imgsz, so whichever worker writes a slot writes the same bytes: the cache changes no output.

Concurrency: one process-shared lock guards the header rows only, never the pixels. A writer marks the
slot as being written (bumping the version) before touching its pixels and publishes it after; a
reader takes a lease (slot, version) before using the pixels in place and checks afterwards, in
`unchanged`, that nobody began rewriting the slot meanwhile (a worker far behind the others can meet
its slot reused by a window two ahead). The lock's acquire/release order the pixel accesses against the
header on every architecture, so no pixel is ever used half-written: the caller redoes the item from a
private decode when a lease broke.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import multiprocessing
import sys
from typing import Any

import numpy as np
import torch

_WRITING = -1  # header key of a slot whose pixels are being written


class SharedImageCache:
    """`slots` decoded images of at most `slot_bytes` each, shared by the processes forked (or spawned by
    a DataLoader) after it was made. Pages are committed only as slots are filled."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"need slots >= 1 and slot_bytes >= 1, got {slots}, {slot_bytes}")
        self.slots, self.slot_bytes = slots, slot_bytes
        self._pixels = shared_uint8((slots * slot_bytes,))
        self._header = shared_uint8((slots * 4 * 8,)).zero_()  # int64 rows: version, index + 1 (0: empty), h, w
        self._lock = multiprocessing.Lock()
        self._views()

    def _views(self) -> None:
        self._pix = self._pixels.numpy()
        self._head = self._header.numpy().view(np.int64).reshape(self.slots, 4)

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker gets the tensors (shared), not the views
        return {k: v for k, v in self.__dict__.items() if k not in ("_pix", "_head")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._views()

    def get(self, slot: int, index: int) -> tuple[np.ndarray, tuple[int, int]] | None:
        """Image `index` from `slot` (a read-only view of the shared pixels) and its lease, or None."""
        with self._lock:
            version, key, height, width = (int(v) for v in self._head[slot])
        if key != index + 1:
            return None
        return self._view(slot, height, width), (slot, version)

    def put(self, slot: int, index: int, img: np.ndarray) -> tuple[np.ndarray, tuple[int, int]] | None:
        """Copy `img` into `slot` as image `index`; its shared view and lease, or None when the slot is
        being written by another process (the caller keeps its own copy)."""
        if img.nbytes > self.slot_bytes or img.dtype != np.uint8:
            raise ValueError(f"an image of {img.nbytes} bytes ({img.dtype}) does not fit a {self.slot_bytes}-byte slot")
        with self._lock:
            if self._head[slot, 1] == _WRITING:
                return None
            self._head[slot, 0] += 1
            self._head[slot, 1] = _WRITING
        height, width = img.shape[:2]
        view = self._pix[slot * self.slot_bytes : slot * self.slot_bytes + img.nbytes].reshape(img.shape)
        np.copyto(view, img)
        with self._lock:
            version = int(self._head[slot, 0]) + 1
            self._head[slot] = (version, index + 1, height, width)
        return self._view(slot, height, width), (slot, version)

    def unchanged(self, leases: list[tuple[int, int]]) -> bool:
        """Whether no slot of these leases was rewritten since it was taken (the pixels used were whole)."""
        with self._lock:
            return all(int(self._head[slot, 0]) == version for slot, version in leases)

    def _view(self, slot: int, height: int, width: int) -> np.ndarray:
        start = slot * self.slot_bytes
        view = self._pix[start : start + height * width * 3].reshape(height, width, 3)
        view.flags.writeable = False
        return view


def shared_uint8(shape: tuple[int, ...], commit: bool = False) -> torch.Tensor:
    """An uninitialised uint8 tensor in shared memory (as torch's default_collate makes in a worker);
    forked children and DataLoader workers map the same memory. Its pages are committed as they are first
    written, or, with `commit`, all at once now (see `commit_pages`): for memory about to be filled whole."""
    elem = torch.empty(0, dtype=torch.uint8)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    tensor = elem.new(storage).resize_(*shape)
    if commit:
        commit_pages(tensor)
    return tensor


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_libc: Any = None


def commit_pages(tensor: torch.Tensor) -> None:
    """Allocate and map every page of a shared-memory tensor in one system call (madvise
    MADV_POPULATE_WRITE) instead of one page fault per 4 KiB page as it is first written: about 20% less
    CPU for a 640 px batch image (~300 pages). Elsewhere than on Linux >= 5.14, and for memory not starting
    on a page, the pages are simply faulted in as before."""
    global _libc
    address, size = tensor.data_ptr(), tensor.untyped_storage().nbytes()
    if not size or address % mmap.PAGESIZE or not sys.platform.startswith("linux"):
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.madvise(address, size, _MADV_POPULATE_WRITE)  # fails harmlessly (EINVAL) on older kernels
