"""The fast training pipeline: reduced JPEG decodes, the fused mosaic + affine warp, windowed mosaic
partners; items stay a pure function of (seed, epoch, index) at any worker count and loading order."""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from yolo_resume.config import AugmentConfig, DataConfig
from yolo_resume.data import DetectionDataset, EpochBatchSampler, collate_fn, epoch_permutation, load_split
from yolo_resume.data import augment as aug
from yolo_resume.data.dataset import window_block
from yolo_resume.data.records import ImageRecord
from yolo_resume.errors import DataError

IMGSZ = 64
COUNT = 32
AUG = AugmentConfig(
    mosaic=1.0, close_mosaic=0, mosaic_window=0
)  # partners from the whole split; flip, HSV, ...: defaults
WINDOW = 16
WINDOWED = AugmentConfig(mosaic=1.0, close_mosaic=0, mosaic_window=WINDOW)


def rectangles_split(root: Path, count: int = COUNT, size: tuple[int, int] = (200, 150)):
    """`count` JPEGs (decoded at half size for IMGSZ) of a bright rectangle on a dark background, kept
    40 px from the border (rectangles of neighbouring mosaic tiles do not touch), with its box, in the
    YOLO layout."""
    rng = np.random.default_rng(0)
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    w, h = size
    for i in range(count):
        img = np.full((h, w, 3), 30, np.uint8)
        x1, y1 = int(rng.integers(40, w - 100)), int(rng.integers(40, h - 80))
        x2, y2 = x1 + int(rng.integers(30, 60)), y1 + int(rng.integers(20, 40))
        img[y1:y2, x1:x2] = 230
        row = f"0 {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n"
        cv2.imwrite(str(root / "images" / "train" / f"{i:03d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        (root / "labels" / "train" / f"{i:03d}.txt").write_text(row)
    return load_split(DataConfig(format="yolo", root=str(root), names=["r"]), "train")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return rectangles_split(tmp_path_factory.mktemp("rectangles"))


def dataset(split, augment=AUG, seed=3) -> DetectionDataset:
    return DetectionDataset(split, IMGSZ, augment=augment, seed=seed, epochs=10)


def same_item(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("img", "cls", "bboxes")) and a["image_id"] == b["image_id"]


@pytest.mark.parametrize("augment", [AUG, WINDOWED], ids=["uniform", "window"])
def test_items_do_not_depend_on_loading_order_cache_or_instance(split, augment):
    in_order = dataset(split, augment)
    keys = [(e, i) for e in (0, 1) for i in epoch_permutation(COUNT, 3, e)]
    reference = {k: in_order[k] for k in keys}
    shuffled = list(keys)
    random.Random(1).shuffle(shuffled)
    other = dataset(split, augment)  # a resumed run: a fresh instance, its cache filled in another order
    assert all(same_item(other[k], reference[k]) for k in shuffled)
    assert not same_item(reference[(0, 5)], reference[(1, 5)])  # epochs differ
    assert not same_item(reference[(0, 5)], dataset(split, seed=4)[(0, 5)])  # seeds differ


@pytest.mark.parametrize("augment", [AUG, WINDOWED], ids=["uniform", "window"])
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_the_same_items_at_any_worker_count(split, workers, augment):
    ds = dataset(split, augment)
    sampler = EpochBatchSampler(COUNT, 8, seed=3)
    sampler.set_epoch(1)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers))
    keys = [(1, int(i)) for i in epoch_permutation(COUNT, 3, 1)]
    expected = collate_fn([dataset(split, augment)[k] for k in keys])
    assert torch.equal(torch.cat([b["img"] for b in batches]), expected["img"])
    assert torch.equal(torch.cat([b["bboxes"] for b in batches]), expected["bboxes"])
    assert batches[0]["img"].is_contiguous() and batches[0]["img"].dtype == torch.uint8


def test_mosaic_partners_come_from_the_items_window_of_the_epoch_order(split):
    ds = dataset(split, WINDOWED)
    window = WINDOW
    for epoch in (0, 1):
        order = epoch_permutation(COUNT, 3, epoch)
        for pos, index in enumerate(order):
            u = tuple(np.random.default_rng([epoch, int(index)]).random(3))
            partners = ds.mosaic_partners(epoch, int(index), u)
            start, size = window_block(pos, COUNT, window)
            assert set(partners) <= set(order[start : start + size].tolist()) - {int(index)}
    # across epochs an image meets every other image
    met = {p for e in range(60) for p in ds.mosaic_partners(e, 0, (0.1, 0.5, 0.9))}
    assert len(met) > COUNT // 2


@pytest.mark.parametrize("n", [2, 3, 31, 32, 33, 200, 1000])
@pytest.mark.parametrize("window", [2, 4, 16, 128])
def test_partner_blocks_cut_the_order_into_near_equal_pieces(n, window):
    blocks = sorted({window_block(pos, n, window) for pos in range(n)})
    assert all(start <= pos < start + size for pos in range(n) for start, size in [window_block(pos, n, window)])
    assert blocks[0][0] == 0 and sum(size for _, size in blocks) == n  # contiguous, no overlap (sorted starts)
    assert all(a + la == b for (a, la), (b, _) in zip(blocks, blocks[1:], strict=False))
    sizes = [size for _, size in blocks]
    assert min(sizes) >= 2 and max(sizes) - min(sizes) <= 1
    assert len(blocks) == max(1, min(int(n / window + 0.5), n // 2))  # n / window rounded, half up


def test_rank_batches_are_contiguous_pieces_of_the_order():
    order = epoch_permutation(100, 5, 2)
    padded = np.resize(order, 100)
    for rank in (0, 1):
        sampler = EpochBatchSampler(100, 16, seed=5, rank=rank, world_size=2)
        sampler.set_epoch(2)
        batches = [[i for _, i in b] for b in sampler]
        assert batches[0] == padded[16 * rank : 16 * rank + 16].tolist()
        assert batches[-1] == padded[96 + 2 * rank : 98 + 2 * rank].tolist()  # the tail: 4 left, 2 each


def test_reduced_jpeg_decode_has_the_needed_size_and_matches_a_full_decode(split, tmp_path):
    rec = split.records[0]  # 200x150; imgsz 64 needs 64x48
    ratio, new_w, new_h, _, _ = aug.letterbox_geometry(rec.width, rec.height, IMGSZ)
    assert aug.decode(rec, need=(new_w, new_h)).shape == (75, 100, 3)  # 1/2: the smallest still >= 64x48
    assert aug.decode(rec, need=(rec.width, rec.height)).shape == (150, 200, 3)
    img, got_ratio = aug.load_resized(rec, IMGSZ)
    assert img.shape == (new_h, new_w, 3) and got_ratio == ratio
    full = cv2.resize(aug.decode(rec), (new_w, new_h), interpolation=cv2.INTER_AREA)
    assert np.abs(img.astype(int) - full).mean() < 3
    # odd sizes: libjpeg rounds the reduced size up; a PNG is never decoded reduced
    odd = tmp_path / "odd.jpg"
    cv2.imwrite(str(odd), np.full((333, 501, 3), 90, np.uint8))
    rec_odd = SimpleNamespace(path=odd, width=501, height=333)  # all decoding reads of a record
    assert aug.decode(rec_odd, need=(125, 83)).shape == (84, 126, 3)  # 1/4 of 501x333, rounded up
    assert aug.load_resized(rec_odd, 125)[0].shape == (83, 125, 3)
    png = tmp_path / "odd.png"
    cv2.imwrite(str(png), np.full((333, 501, 3), 90, np.uint8))
    assert aug.decode(SimpleNamespace(path=png, width=501, height=333), need=(125, 83)).shape == (333, 501, 3)


def to_opencv(matrix: np.ndarray) -> np.ndarray:
    """A continuous-coordinate map (pixel i spans [i, i+1]) in OpenCV's convention (centres at integers)."""
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    return (np.linalg.inv(shift) @ matrix @ shift)[:2]


@pytest.mark.parametrize(
    ("scale", "flip", "shift"), [(0.6, False, (0.05, -0.08)), (1.4, True, (-0.1, 0.1)), (1.0, True, (0.0, 0.0))]
)
def test_compose_is_paste_then_warp(scale, flip, shift):
    """Each tile of the fused mosaic + affine is that tile pasted on the canvas and warped by the map
    compose reports for it (away from its edges), that map is within a pixel of the nominal one, and
    the rest of the output is padding."""
    rng = np.random.default_rng(0)
    imgsz, size = 96, 192
    tiles = [cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 4) for h, w in
             ((72, 96), (60, 90), (96, 70), (50, 96))]  # fmt: skip
    offsets = aug.mosaic_offsets([t.shape for t in tiles], imgsz, (0.8, 1.3))
    fused = np.empty((imgsz, imgsz, 3), np.uint8)
    maps = aug.compose(tiles, offsets, (size, size), scale, shift, flip, fused)
    nominal = aug.affine_matrix(size, size, imgsz, scale, shift, flip)
    kernel = np.ones((5, 5), np.uint8)
    ids = np.full((size, size), -1, np.int16)
    covered = 0
    for k, (img, (x0, y0)) in enumerate(zip(tiles, offsets, strict=True)):
        h, w = img.shape[:2]
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
        canvas = np.full((size, size, 3), aug.PAD_VALUE, np.uint8)
        canvas[cy1:cy2, cx1:cx2] = img[cy1 - y0 : cy2 - y0, cx1 - x0 : cx2 - x0]
        ids[cy1:cy2, cx1:cx2] = k
        reference = cv2.warpAffine(canvas, to_opencv(maps[k]), (imgsz, imgsz), borderValue=(aug.PAD_VALUE,) * 3)
        interior = cv2.erode((ids == k).astype(np.uint8), kernel, borderType=cv2.BORDER_REPLICATE)
        inside = cv2.warpAffine(interior, to_opencv(maps[k]), (imgsz, imgsz), flags=cv2.INTER_NEAREST).astype(bool)
        if not inside.any():
            continue
        assert np.abs(fused.astype(int) - reference)[inside].max() <= 2
        covered += inside.sum()
        ys, xs = np.nonzero(inside)
        for corner in ((xs.min(), ys.min(), 1), (xs.max() + 1, ys.max() + 1, 1)):
            source = np.linalg.solve(maps[k], np.array(corner, float))
            np.testing.assert_allclose((nominal @ source)[:2], corner[:2], atol=1.0)
    assert covered > 0.5 * imgsz**2
    pad = cv2.erode((ids == -1).astype(np.uint8), kernel, borderType=cv2.BORDER_REPLICATE)
    outside = cv2.warpAffine(pad, to_opencv(nominal), (imgsz, imgsz), flags=cv2.INTER_NEAREST, borderValue=1)
    assert outside.any() and (fused[outside.astype(bool)] == aug.PAD_VALUE).all()


def test_hsv_is_ultralytics(monkeypatch):
    """`hsv_jitter` with the gains ultralytics' RandomHSV draws gives its bytes exactly."""
    from ultralytics.data.augment import RandomHSV

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    for gains in ((0.01, -0.6, 0.3), (-0.015, 0.7, -0.4), (0.0, 0.2, 0.0)):
        monkeypatch.setattr(np.random, "uniform", lambda *a, g=gains: np.array(g) / (0.015, 0.7, 0.4))
        theirs = RandomHSV(0.015, 0.7, 0.4)({"img": img.copy()})["img"]
        assert np.array_equal(aug.hsv_jitter(img.copy(), gains), theirs)


def test_boxes_land_on_the_rectangles(split):
    """Through reduced decode, mosaic, scale, shift and flip, each box is its bright rectangle's extent."""
    ds = dataset(split, AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=1.0, close_mosaic=0, translate=0.2))
    checked = 0
    for epoch in range(3):
        for i in range(0, COUNT, 2):
            item = ds[(epoch, i)]
            bright = (item["img"].numpy() > 130).all(0).astype(np.uint8)
            _, component, stats, _ = cv2.connectedComponentsWithStats(bright)
            for cx, cy, w, h in (item["bboxes"].numpy() * IMGSZ).tolist():
                # the bright rectangle under the box centre has the box's extent, to within the blur
                x, y, bw, bh, _ = stats[component[int(cy), int(cx)]]
                np.testing.assert_allclose(
                    [x, y, x + bw, y + bh], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1.5
                )
                checked += 1
    assert checked > 30


def test_val_items_are_rgb_letterboxes(split):
    ds = DetectionDataset(split, IMGSZ)
    item = ds[0]
    assert item["img"].shape == (3, IMGSZ, IMGSZ) and item["img"].dtype == torch.uint8
    rec = split.records[0]
    bgr = aug.pad_to_square(aug.load_resized(rec, IMGSZ)[0], IMGSZ)
    assert torch.equal(item["img"], torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1))


def test_a_fetched_batch_is_collated_without_a_copy(split):
    ds = dataset(split)
    keys = [(0, i) for i in range(8)]
    items = ds.__getitems__(keys)
    batch = collate_fn(items)["img"]
    assert batch.data_ptr() == items[0]["img"].data_ptr() and batch.shape == (8, 3, IMGSZ, IMGSZ)
    assert torch.equal(batch, torch.stack([dataset(split)[k]["img"] for k in keys]))
    assert collate_fn(items[2:5])["img"].data_ptr() != items[2]["img"].data_ptr()  # a part: stacked


def test_uniform_partners_come_from_the_whole_split(split):
    ds = dataset(split)
    order = epoch_permutation(COUNT, 3, 0).tolist()
    far = 0
    for index in range(COUNT):
        partners = ds.mosaic_partners(0, index, (0.05, 0.5, 0.95))
        assert partners == tuple(min(int(u * COUNT), COUNT - 1) for u in (0.05, 0.5, 0.95))
        window = order.index(index) // WINDOW
        far += any(order.index(p) // WINDOW != window for p in partners)
    assert far > 0
    assert same_item(ds[(1, 3)], dataset(split)[(1, 3)])


def test_the_default_draws_partners_from_a_window_of_the_order_through_the_shared_cache(split):
    ds = dataset(split, AugmentConfig(mosaic=1.0, close_mosaic=0))
    assert ds.augment.mosaic_window == 128 and ds._shared is not None  # 128 >= COUNT: the whole split but itself
    order = epoch_permutation(COUNT, 3, 0)
    assert all(index not in ds.mosaic_partners(0, int(index), (0.0, 0.5, 0.999)) for index in order)


SMALL_WINDOW = AugmentConfig(mosaic=1.0, close_mosaic=0, mosaic_window=4)  # 10 shared slots for 32 images


def count_decodes(monkeypatch) -> list[int]:
    calls = [0]
    real = aug.decode

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(aug, "decode", counted)
    return calls


def test_the_shared_cache_reuses_its_slots_and_changes_no_item(split, monkeypatch):
    private = dataset(split, SMALL_WINDOW)
    private._shared = None  # every tile from this process's own decodes
    keys = [(e, int(i)) for e in (0, 1) for i in epoch_permutation(COUNT, 3, e)]
    reference = [private[k] for k in keys]
    decodes = count_decodes(monkeypatch)
    shared = dataset(split, SMALL_WINDOW)
    assert shared._shared is not None and shared._shared.slots == 10  # two blocks of 4, plus 2
    assert all(same_item(shared[k], ref) for k, ref in zip(keys, reference, strict=True))
    # 4 tiles per item, but in order each image is decoded at most once per epoch: its window's slots hold it
    assert decodes[0] <= len(keys)


def test_an_item_whose_tiles_were_overwritten_while_read_is_redone_from_its_own_decodes(split, monkeypatch):
    reference = dataset(split, SMALL_WINDOW)[(0, 5)]
    ds = dataset(split, SMALL_WINDOW)
    cache, real = ds._shared, aug.compose
    other_worker = [True]

    def compose_while_another_worker_rewrites_every_slot(images, *args):
        if other_worker.pop() if other_worker else False:
            for slot in range(cache.slots):
                cache.put(slot, 10_000 + slot, np.zeros((IMGSZ, IMGSZ, 3), np.uint8))
        return real(images, *args)

    monkeypatch.setattr(aug, "compose", compose_while_another_worker_rewrites_every_slot)
    assert same_item(ds[(0, 5)], reference)


def test_an_image_put_by_one_process_is_read_by_another():
    import multiprocessing

    from yolo_resume.data.shared_cache import SharedImageCache

    cache = SharedImageCache(slots=2, slot_bytes=4 * 5 * 3)
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    child = multiprocessing.get_context("fork").Process(target=cache.put, args=(1, 7, img))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert cache.get(0, 7) is None and cache.get(1, 6) is None
    got, lease = cache.get(1, 7)
    assert np.array_equal(got, img) and not got.flags.writeable and cache.unchanged([lease])
    cache.put(1, 8, img[::-1].copy())
    assert not cache.unchanged([lease]) and cache.get(1, 7) is None


def resident_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """(pages of the tensor's memory in RAM, pages in all), from mincore(2)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = tensor.untyped_storage().nbytes()
    pages = -(-size // mmap.PAGESIZE)
    vec = ctypes.create_string_buffer(pages)
    assert libc.mincore(tensor.data_ptr(), size, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw), pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_WRITE) is Linux's")
def test_a_batch_buffer_is_committed_before_it_is_written_and_a_cache_only_as_it_fills():
    from yolo_resume.data.shared_cache import SharedImageCache, shared_uint8

    if tuple(int(v) for v in re.findall(r"\d+", os.uname().release)[:2]) < (5, 14):
        pytest.skip("MADV_POPULATE_WRITE needs Linux >= 5.14")
    resident, pages = resident_pages(shared_uint8((4, 3, 64, 64), commit=True))
    assert resident == pages > 10
    resident, pages = resident_pages(SharedImageCache(slots=8, slot_bytes=64 * 64 * 3)._pixels)
    assert pages > 10 and resident <= 1  # a cache's slots fill over an epoch: committed as written (torch writes one)


@pytest.mark.parametrize(
    "mode,options",
    [
        ("RGB", {"subsampling": 0}),
        ("RGB", {"subsampling": 1}),
        ("RGB", {}),
        ("RGB", {"progressive": True}),
        ("L", {}),
        ("RGB", {"orientation": 3}),
        ("RGB", {"orientation": 6}),
        ("CMYK", {}),
    ],
)
def test_jpegs_decode_to_opencvs_pixels_through_simplejpeg_unless_opencv_may_rotate_them(tmp_path, mode, options):
    from PIL import Image

    rgb = cv2.GaussianBlur(np.random.default_rng(2).integers(0, 256, (40, 56, 3), dtype=np.uint8), (0, 0), 2)
    im = Image.fromarray(rgb).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = options.pop("orientation", 1)
    path = tmp_path / "a.jpg"
    im.save(path, quality=90, exif=exif if exif[0x0112] != 1 else b"", **options)
    buf = np.fromfile(path, np.uint8)
    expected = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    height, width = expected.shape[:2]
    rec = ImageRecord(path, width, height, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 0)
    assert np.array_equal(aug.decode(rec), expected)
    for factor, flag in ((1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4)):
        fast = aug.decode_plain_jpeg(buf, width, height, factor)
        assert (fast is None) == (exif[0x0112] != 1)  # OpenCV may rotate a JPEG with EXIF: it decodes those
        assert fast is None or np.array_equal(fast, cv2.imdecode(buf, flag))
    assert aug.decode_plain_jpeg(buf, width + 1, height, 1) is None  # not the size the record says: OpenCV's path


def test_a_truncated_jpeg_is_left_to_opencv_which_rejects_it(tmp_path):
    path = tmp_path / "a.jpg"
    img = cv2.GaussianBlur(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8), (0, 0), 2)
    data = cv2.imencode(".jpg", img)[1].tobytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert aug.decode_plain_jpeg(np.fromfile(path, np.uint8), 64, 64) is None
    rec = ImageRecord(path, 64, 64, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 0)
    with pytest.raises(DataError, match="cannot be decoded"):
        aug.decode(rec)


@pytest.mark.parametrize("orientation", [1, 3, 6])
def test_reduced_decode_applies_exif_rotation_as_a_full_decode_does(tmp_path, orientation):
    from PIL import Image

    rgb = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8), (0, 0), 2)
    path = tmp_path / "exif.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, quality=90, exif=exif.tobytes())
    full = cv2.imread(str(path))  # OpenCV applies the rotation: 6 turns the 64x48 image into 48x64
    h, w = full.shape[:2]
    assert (w, h) == ((48, 64) if orientation == 6 else (64, 48))
    rec = SimpleNamespace(path=path, width=w, height=h)
    assert np.array_equal(aug.decode(rec), full)
    half = aug.decode(rec, need=(w // 2, h // 2))
    assert half.shape == (h // 2, w // 2, 3)
    assert np.array_equal(half, cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_2))
