"""bench.py's measuring tools against what they measure, known by construction."""
import torch

import bench


def test_cpu_peak_memory_counts_live_tensors():
    n = 1 << 20  # 4 MiB of float32

    def fn():
        a = torch.ones(n)
        b = a * 2  # a and b alive: 8 MiB
        del a
        c = b + 1  # b and c alive: 8 MiB again, never 12
        return c.sum()

    peak = bench.peak_memory(fn, torch.device("cpu"))
    assert 8 * 2 ** 20 <= peak < 8 * 2 ** 20 + 4096, peak


def test_blobs_cover_the_density_in_every_image():
    masks = bench.blobs(3, (40, 60), 0.1, seed=0, device="cpu")
    assert masks.shape == (3, 40, 60) and masks.dtype == torch.bool
    assert masks.flatten(1).sum(1).tolist() == [240] * 3  # the k highest of a continuous field: k = 0.1 * 40 * 60
