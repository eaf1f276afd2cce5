"""Threads for array work whose C loops release the GIL (scipy.ndimage's resampling and filters,
numpy's large element-wise operations): a few independent arrays side by side.

CPU threads follow `napari_mtml.devices`'s rule: callers pass as many workers as torch has
threads (`torch.get_num_threads()`), so that a prediction never asks for more cores than its
network does. One worker runs everything in the calling thread.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

__all__ = ["map_threads"]


def map_threads(func, items, workers: int) -> list:
    """`[func(item) for item in items]`, in up to `workers` threads when there is more than one
    item and more than one worker; the results in the items' order."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [func(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(int(workers), len(items))) as pool:
        return list(pool.map(func, items))
