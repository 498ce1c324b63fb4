"""The pure-Python parts of the CUDA-only code, run without a GPU: the GPU split
heuristic at a given SM count, the SM count lookup, the device guard, and the
seed a CUDA generator hands to an op. (The CUDA cases of the other tests are
generated everywhere and show as skipped without a GPU.)"""

import types

import pytest
import torch
import triton
from fastvae.kernels import _shared

from fastvae import functional

SHAPES = [(1, 1), (3, 7), (1, 1 << 20), (7, 100_003), (256, 1 << 20), (4096, 512),
          (64, 128), (100_000, 3), (8, 2048), (2, 2049)]
SM_COUNTS = [1, 16, 132]


def check_covers(split, rows, cols):
    """The programs tile the (rows, cols) view exactly: no element left, no empty chunk."""
    per_chunk = split.block * split.iters
    assert split.chunks * per_chunk >= cols > (split.chunks - 1) * per_chunk
    assert split.programs == triton.cdiv(rows, split.rows) * split.chunks
    assert split.block & (split.block - 1) == 0 and split.rows & (split.rows - 1) == 0


@pytest.mark.parametrize("sm_count", SM_COUNTS)
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_gpu_split_tiles_the_view_and_fills_every_sm(rows, cols, sm_count):
    split = _shared._heuristic_split(rows, cols, False, sm_count)
    check_covers(split, rows, cols)
    # tiles of at most 2048 elements; short rows share one; up to 8 tiles per program
    assert split.block <= min(2048, triton.next_power_of_2(cols))
    assert split.block * split.rows <= max(2048, split.block)
    assert split.rows <= triton.next_power_of_2(rows)
    assert 1 <= split.iters <= 8
    # enough programs to fill every SM several (>= 4) times, when there are that many tiles
    tiles = triton.cdiv(rows, split.rows) * triton.cdiv(cols, split.block)
    assert split.programs >= min(tiles, 4 * sm_count)
    # no more warps than give every thread (32 a warp) an element, beyond the first
    assert split.num_warps in (1, 2, 4, 8)
    assert split.num_warps == 1 or 32 * split.num_warps <= split.block * split.rows


def test_gpu_split_streams_longer_on_few_sms():
    """A long row: one program per tile on 132 SMs; 8 tiles per program on one SM."""
    many = _shared._heuristic_split(1, 1 << 20, False, 132)
    one = _shared._heuristic_split(1, 1 << 20, False, 1)
    assert (many.iters, many.programs) == (1, 512)
    assert (one.iters, one.programs) == (8, 64)


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_interpreted_split_uses_few_large_programs(rows, cols):
    split = _shared._heuristic_split(rows, cols, True, 1)
    check_covers(split, rows, cols)
    assert split.block * split.rows <= max(1 << 15, split.block) and split.iters <= 64
    # one program per row block unless a row is longer than 64 blocks of 2^15
    assert split.chunks == triton.cdiv(cols, split.block * 64) if cols > 64 << 15 else split.chunks == 1


def test_sm_count_is_read_from_the_tensors_device(monkeypatch):
    asked = []

    def properties(index):
        asked.append(index)
        return types.SimpleNamespace(multi_processor_count=100 + index)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    _shared._sm_count_of.cache_clear()
    try:
        assert _shared._sm_count(torch.device("cuda", 1)) == 101
        assert _shared._sm_count(torch.device("cuda")) == 103  # the current device
        assert _shared._sm_count(torch.device("cuda", 1)) == 101  # cached: asked once
        assert _shared._sm_count(torch.device("cpu")) == 1
        assert asked == [1, 3]
    finally:
        _shared._sm_count_of.cache_clear()


def test_row_split_on_a_gpu_uses_the_sm_count(monkeypatch):
    seen = []
    monkeypatch.setattr(_shared, "is_interpreted", lambda: False)
    monkeypatch.setattr(_shared, "_sm_count", lambda device: seen.append(device) or 16)
    split = _shared.row_split(5, 3000, torch.device("cuda", 2))
    assert seen == [torch.device("cuda", 2)]
    assert split == _shared._heuristic_split(5, 3000, False, 16)


def test_device_guard_launches_on_the_tensors_gpu():
    guard = _shared.device_guard(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_device_guard_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(_shared, "is_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors unless TRITON_INTERPRET=1"):
        _shared.device_guard(torch.zeros(1))


class FakeCudaGenerator(torch.Generator):
    """A generator that reports a CUDA device and a Philox (seed, offset) state."""

    seed_value, offset = 1234, 0

    @property
    def device(self):
        return torch.device("cuda", 0)

    def initial_seed(self):
        return self.seed_value

    def get_offset(self):
        return self.offset

    def set_offset(self, offset):
        self.offset = offset


def test_cuda_generator_seed_comes_from_its_state_and_advances_it():
    like = torch.zeros(2, 3)  # non-CUDA data: the generator's state is read on the host
    gen = FakeCudaGenerator()
    first, second = functional._draw_seed(gen, like), functional._draw_seed(gen, like)
    assert gen.offset == 8  # advanced on the host, 4 per draw
    assert first.device.type == "cpu" and first.shape == (1,) and first.dtype == torch.int64
    assert 0 <= first.item() < 2**62 and 0 <= second.item() < 2**62 and first != second
    again = FakeCudaGenerator()
    assert functional._draw_seed(again, like) == first  # same state, same seed
    other = FakeCudaGenerator()
    other.seed_value = 1235
    assert functional._draw_seed(other, like) != first


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generator_reproduces_a_draw():
    mu, logvar = torch.zeros(4, 8, device="cuda"), torch.zeros(4, 8, device="cuda")

    def draw(seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        return functional.reparameterize(mu, logvar, generator=gen)

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
