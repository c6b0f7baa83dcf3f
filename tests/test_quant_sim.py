"""FP8 (E4M3) KV and FP4 (E2M1 + Hadamard) indexer round trips against scalar definitions.

The definitions are written here from MODEL.md §2.3 independently of the model code: every E4M3 /
E2M1 value is enumerated and the nearest one is chosen with ties to the even code.
"""

from __future__ import annotations

import math

import torch

from ds4py.model.model import e2m1_round, fp4_sim, fp8_sim, hadamard


def e4m3_values() -> list[float]:
    vals = [m * 2.0**-9 for m in range(8)]
    vals += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8)]
    return [v for v in vals if v <= 448]


def nearest_even(x: float, grid: list[float]) -> float:
    """Nearest |x| in grid (sorted, code = index); ties go to the even index."""
    m = abs(x)
    best = min(range(len(grid)), key=lambda i: (abs(grid[i] - m), i % 2))
    return math.copysign(grid[best], x) if grid[best] else 0.0


def pow2_ceil(v: float) -> float:
    k = math.ceil(math.log2(v))
    if 2.0 ** (k - 1) >= v:  # guard log2 rounding
        k -= 1
    if 2.0**k < v:
        k += 1
    return 2.0**k


def fp8_ref(row: list[float], n_nope: int) -> list[float]:
    grid = sorted(set(e4m3_values()))
    out = list(row)
    for b in range(0, n_nope, 64):
        blk = row[b : b + 64]
        s = pow2_ceil(max(max(abs(v) for v in blk), 1e-4) / 448)
        out[b : b + 64] = [nearest_even(max(-448, min(448, v / s)), grid) * s for v in blk]
    return out


def fp4_ref(vec: list[float]) -> list[float]:
    n = len(vec)
    y = [sum(((-1) ** bin(i & j).count("1")) * vec[j] for j in range(n)) / math.sqrt(n)
         for i in range(n)]  # fmt: skip
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    out = []
    for b in range(0, n, 32):
        blk = y[b : b + 32]
        s = pow2_ceil(max(max(abs(v) for v in blk), 6 * 2.0**-126) / 6)
        out += [nearest_even(max(-6, min(6, v / s)), grid) * s for v in blk]
    return out


def test_fp8_matches_definition():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 512, generator=g) * torch.tensor([1e-6, 1e-3, 0.1, 1, 50, 3000])[:, None]
    rows[0, :64] = 0  # a zero block uses the 1e-4 floor
    grid = torch.tensor(e4m3_values())
    # exact halfway points between E4M3 values, with a scale of 1 (block max 448)
    mids = ((grid[1:] + grid[:-1]) / 2)[:63]
    rows[5, :64] = torch.cat((torch.tensor([448.0]), mids))
    got = fp8_sim(rows, 448)
    for r in range(rows.shape[0]):
        assert got[r].tolist() == fp8_ref(rows[r].tolist(), 448)
    assert torch.equal(got[:, 448:], rows[:, 448:])  # RoPE dims untouched


def test_fp4_matches_definition():
    g = torch.Generator().manual_seed(1)
    vecs = torch.randn(5, 128, generator=g) * torch.tensor([1e-3, 0.1, 1, 10, 1000])[:, None]
    got = fp4_sim(vecs)
    for r in range(vecs.shape[0]):
        want = torch.tensor(fp4_ref(vecs[r].double().tolist()), dtype=torch.float32)
        torch.testing.assert_close(got[r], want, rtol=0, atol=1e-6 * float(want.abs().max()))


def test_e2m1_ties_go_to_even_code():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0, 6.0])
    assert e2m1_round(ties).tolist() == [0, 1, 1, 2, 2, 4, 4, 0, -2, -4, 6]


def test_hadamard_is_orthonormal():
    x = torch.randn(3, 128, dtype=torch.float64)
    torch.testing.assert_close(hadamard(hadamard(x)), x)
