"""difforge.formats: HiF8Tensor / NVFP4Tensor from ``quantize`` equal the ops composed by hand, and safetensors
checkpoints (save_quantized / load_quantized) keep every bit, write atomically and reject truncated files and
inconsistent metadata with a ValueError. The codecs themselves are tested against plain-PyTorch references in the
op tests of this folder."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

difforge = pytest.importorskip("difforge")
import difforge.formats as F  # noqa: E402
from difforge import ops  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that float comparisons are bitwise (NaN and -0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert torch.equal(_bits(a), _bits(b))


def _assert_same_container(a, b) -> None:
    assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
    if isinstance(a, F.HiF8Tensor):
        _assert_same_bits(a.codes, b.codes)
        _assert_same_bits(a.scale.reshape(()), b.scale.reshape(()))
    else:
        _assert_same_bits(a.block_scales, b.block_scales)
        _assert_same_bits(a.packed, b.packed)
        assert (a.per_tensor_scale is None) == (b.per_tensor_scale is None)
        if a.per_tensor_scale is not None:
            _assert_same_bits(a.per_tensor_scale.reshape(()), b.per_tensor_scale.reshape(()))
        assert a.block_2d == b.block_2d


# ---- quantize / dequantize against the ops ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (4, 48), (2, 3, 32)])
def test_hif8_quantize_equals_the_ops(dtype, shape):
    x = _randn(*shape, dtype=dtype, scale=3.0)
    t = F.quantize(x, "hif8")
    codes, scale = ops.hif8_quantize(x)
    assert isinstance(t, F.HiF8Tensor) and t.format == "hif8"
    assert t.shape == x.shape and t.dtype == dtype and t.device == x.device
    _assert_same_bits(t.codes, codes)
    _assert_same_bits(t.scale, scale)
    assert t.nbytes == x.numel() + 4
    deq = t.dequantize()
    assert deq.dtype == dtype
    _assert_same_bits(deq, ops.hif8_decode(codes, dtype, scale=scale))
    _assert_same_bits(t.dequantize(torch.float32), ops.hif8_fake_quantize(x, dtype=torch.float32))
    _assert_same_bits(F.dequantize(t, torch.float32), t.dequantize(torch.float32))


def test_hif8_options_reach_the_op():
    x = _randn(64, 16, scale=0.01)
    t = F.quantize(x, "hif8", target=224.0, rounding="hybrid")
    codes, scale = ops.hif8_quantize(x, target=224.0, rounding="hybrid")
    _assert_same_bits(t.codes, codes)
    _assert_same_bits(t.scale, scale)
    ta = F.quantize(x, "hif8", target=224.0)
    assert (ta.dequantize() * ta.scale).abs().max() == 224  # TA puts the amax exactly on the target
    with pytest.raises(TypeError):
        F.quantize(x, "hif8", block_2d=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 16), (5, 64), (2, 32, 48)])
def test_nvfp4_two_level_equals_the_ops(dtype, shape):
    x = _randn(*shape, dtype=dtype, scale=2.0)
    t = F.quantize(x, "nvfp4")
    pts = ops.nvfp4_per_tensor_scale(x)
    scales, packed = ops.nvfp4_quantize(x, pts)
    assert isinstance(t, F.NVFP4Tensor) and t.format == "nvfp4"
    assert t.shape == x.shape and t.dtype == dtype and not t.block_2d
    _assert_same_bits(t.block_scales, scales)
    _assert_same_bits(t.packed, packed)
    _assert_same_bits(t.per_tensor_scale, pts)
    assert t.nbytes == x.numel() // 2 + x.numel() // 16 + 4
    _assert_same_bits(t.dequantize(), ops.nvfp4_dequantize(scales, packed, pts, dtype))
    _assert_same_bits(t.dequantize(torch.float32), ops.nvfp4_dequantize(scales, packed, pts, torch.float32))


def test_nvfp4_one_level_and_2d_blocks_equal_the_ops():
    x = _randn(32, 64, scale=5.0)
    one = F.quantize(x, "nvfp4", per_tensor=False)
    scales, packed = ops.nvfp4_quantize(x, None)
    assert one.per_tensor_scale is None and one.nbytes == 32 * 64 // 2 + 32 * 64 // 16
    _assert_same_bits(one.block_scales, scales)
    _assert_same_bits(one.packed, packed)
    _assert_same_bits(one.dequantize(), ops.nvfp4_dequantize(scales, packed, None, torch.float32))

    tiles = F.quantize(x, "nvfp4", block_2d=True)
    pts = ops.nvfp4_per_tensor_scale(x)
    scales, packed = ops.nvfp4_quantize(x, pts, block_2d=True)
    assert tiles.block_2d
    _assert_same_bits(tiles.block_scales, scales)
    _assert_same_bits(tiles.packed, packed)
    # one scale per 16 x 16 tile: every row of a tile carries the same scales
    assert torch.equal(_bits(tiles.block_scales).reshape(2, 16, 4)[:, :1].expand(2, 16, 4).reshape(-1),
                       _bits(tiles.block_scales))  # fmt: skip


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 16"):
        F.quantize(torch.randn(4, 24), "nvfp4")
    with pytest.raises(ValueError, match="format"):
        F.quantize(torch.randn(4, 16), "mxfp4")
    with pytest.raises(TypeError, match="dtype"):
        F.quantize(torch.ones(4, 16, dtype=torch.int32), "hif8")
    with pytest.raises(TypeError):
        F.quantize(torch.randn(4, 16), "nvfp4", target=15.0)
    with pytest.raises(TypeError):
        F.dequantize(torch.randn(4), torch.float32)


def test_containers_check_their_fields():
    x = _randn(4, 32)
    t = F.quantize(x, "nvfp4")
    with pytest.raises(ValueError, match="uint8"):
        F.HiF8Tensor(x, torch.tensor(1.0))
    with pytest.raises(ValueError, match="float32"):
        F.HiF8Tensor(torch.zeros(4, dtype=torch.uint8), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="same"):
        F.NVFP4Tensor(t.block_scales, t.packed[:, :8], t.per_tensor_scale)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        F.NVFP4Tensor(t.block_scales.view(torch.uint8), t.packed)


def test_to_and_quantize_drop_autograd_history():
    x = _randn(4, 32).requires_grad_()
    for fmt in ("hif8", "nvfp4"):
        t = F.quantize(x, fmt)
        moved = t.to("cpu")
        _assert_same_container(t, moved)
        assert not t.dequantize().requires_grad
        assert fmt in repr(t).lower() and "shape=[4, 32]" in repr(t)


@pytest.mark.cuda
def test_to_cuda_and_back_keeps_every_bit():
    x = _randn(16, 64, scale=3.0)
    for t in (F.quantize(x, "hif8"), F.quantize(x, "nvfp4", block_2d=True)):
        on_gpu = t.to("cuda")
        assert on_gpu.device.type == "cuda"
        _assert_same_container(t, on_gpu.to("cpu"))
        _assert_same_bits(on_gpu.dequantize().cpu(), t.dequantize())


# ---- safetensors checkpoints ----


def _checkpoint():
    w = _randn(32, 48, dtype=torch.bfloat16, seed=1)
    return {
        "blocks.0.attn.qkv.weight": F.quantize(w, "hif8"),
        "blocks.0.mlp.fc1.weight": F.quantize(w, "nvfp4", block_2d=True),
        "blocks.0.mlp.fc2.weight": F.quantize(_randn(16, 32, seed=2), "nvfp4", per_tensor=False),
        "act": F.quantize(_randn(2, 3, 16, dtype=torch.float16, seed=3), "hif8", target=224.0),
        "blocks.0.mlp.fc1.bias": _randn(32, dtype=torch.bfloat16, seed=4),
        "step": torch.tensor(1234, dtype=torch.int64),
    }


def test_save_load_round_trip_keeps_every_bit_and_the_order(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _checkpoint()
    F.save_quantized(path, tensors, metadata={"recipe": "osp-next", "step": "1234"})
    loaded = F.load_quantized(path)
    assert list(loaded) == list(tensors)
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            _assert_same_bits(loaded[name], value)
        else:
            _assert_same_container(loaded[name], value)
            _assert_same_bits(loaded[name].dequantize(), value.dequantize())
    assert F.read_metadata(path) == {"recipe": "osp-next", "step": "1234"}
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # no temporary file left behind


def test_file_layout_uses_suffixed_tensor_names(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "m.safetensors"
    F.save_quantized(path, _checkpoint())
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_tensor("blocks.0.mlp.fc1.weight.block_scales").dtype == torch.float8_e4m3fn
    assert {"blocks.0.attn.qkv.weight.codes", "blocks.0.attn.qkv.weight.scale", "blocks.0.mlp.fc1.weight.packed",
            "blocks.0.mlp.fc1.weight.per_tensor_scale", "blocks.0.mlp.fc2.weight.block_scales", "act.codes",
            "blocks.0.mlp.fc1.bias", "step"} <= keys  # fmt: skip
    assert "blocks.0.mlp.fc2.weight.per_tensor_scale" not in keys  # one-level: no tensor scale stored
    entries = json.loads(meta["difforge.formats"])["entries"]
    assert entries["blocks.0.mlp.fc1.weight"] == {"format": "nvfp4", "shape": [32, 48], "dtype": "bfloat16",
                                                  "block_2d": True}  # fmt: skip
    assert entries["step"] == {"format": "tensor", "shape": [], "dtype": "int64"}


def test_overwrite_is_atomic_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    F.save_quantized(path, {"a": F.quantize(_randn(4, 16), "hif8")})
    before = path.read_bytes()
    F.save_quantized(path, {"b": F.quantize(_randn(4, 16), "nvfp4")})
    assert list(F.load_quantized(path)) == ["b"]
    after = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(before[:10])  # a torn write
        raise OSError("disk full")

    monkeypatch.setattr("difforge._durable.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        F.save_quantized(path, {"c": F.quantize(_randn(4, 16), "hif8")})
    assert path.read_bytes() == after and after != before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.05, 7], ids=["last-byte", "half", "header", "length-field"])
def test_truncated_file_raises_value_error(tmp_path, keep):
    path = tmp_path / "m.safetensors"
    F.save_quantized(path, _checkpoint())
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated"):
        F.load_quantized(cut)
    with pytest.raises(FileNotFoundError):
        F.load_quantized(tmp_path / "missing.safetensors")


def _write_raw(path, tensors, entries, version=1):
    save_file(tensors, str(path), metadata={"difforge.formats": json.dumps({"version": version, "entries": entries})})


def _hif8_parts(name="w", shape=(4, 16)):
    t = F.quantize(_randn(*shape), "hif8")
    entry = {"format": "hif8", "shape": list(shape), "dtype": "float32"}
    return {f"{name}.codes": t.codes, f"{name}.scale": t.scale}, entry


def _nvfp4_parts(name="w"):
    t = F.quantize(_randn(4, 32), "nvfp4")
    parts = {f"{name}.block_scales": t.block_scales, f"{name}.packed": t.packed}
    parts[f"{name}.per_tensor_scale"] = t.per_tensor_scale
    return parts, {"format": "nvfp4", "shape": [4, 32], "dtype": "float32", "block_2d": False}


def _inconsistent_files():
    parts, entry = _hif8_parts()
    yield "shape", parts, {"w": {**entry, "shape": [4, 17]}}, "shape"
    yield "dtype", parts, {"w": {**entry, "dtype": "int8"}}, "dtype"
    yield "format", parts, {"w": {**entry, "format": "mxfp4"}}, "description"
    yield "missing", {"w.codes": parts["w.codes"]}, {"w": entry}, "missing"
    yield "extra", {**parts, "stray": torch.zeros(2)}, {"w": entry}, "no entry"
    yield "scale", {**parts, "w.scale": torch.ones(2)}, {"w": entry}, "float32"
    nv_parts, nv_entry = _nvfp4_parts()
    yield "nvfp4-packed", {**nv_parts, "w.packed": nv_parts["w.packed"][:, :8].contiguous()}, {"w": nv_entry}, "same"
    as_bytes = nv_parts["w.block_scales"].view(torch.uint8)
    yield "nvfp4-scales", {**nv_parts, "w.block_scales": as_bytes}, {"w": nv_entry}, "float8"
    yield "plain-dtype", {"b": torch.zeros(3)}, {"b": {"format": "tensor", "shape": [3], "dtype": "int64"}}, "dtype"


@pytest.mark.parametrize("case", list(_inconsistent_files()), ids=lambda case: case[0])
def test_inconsistent_metadata_raises_value_error(tmp_path, case):
    _, tensors, entries, message = case
    path = tmp_path / "bad.safetensors"
    _write_raw(path, tensors, entries)
    with pytest.raises(ValueError, match=message):
        F.load_quantized(path)


def test_bad_description_json_and_version_raise_value_error(tmp_path):
    parts, entry = _hif8_parts()
    path = tmp_path / "bad.safetensors"
    save_file(parts, str(path), metadata={"difforge.formats": "{not json"})
    with pytest.raises(ValueError, match="JSON"):
        F.load_quantized(path)
    _write_raw(path, parts, {"w": entry}, version=99)
    with pytest.raises(ValueError, match="version"):
        F.load_quantized(path)


def test_foreign_safetensors_file_loads_as_plain_tensors(tmp_path):
    path = tmp_path / "plain.safetensors"
    tensors = {"a": _randn(3, 4), "b": torch.arange(5)}
    save_file(tensors, str(path), metadata={"origin": "elsewhere"})
    loaded = F.load_quantized(path)
    assert set(loaded) == {"a", "b"} and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert F.read_metadata(path) == {"origin": "elsewhere"}


def test_save_rejects_clashes_and_bad_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    w = F.quantize(_randn(4, 16), "hif8")
    with pytest.raises(ValueError, match="already used"):
        F.save_quantized(path, {"w": w, "w.codes": torch.zeros(2)})
    with pytest.raises(ValueError, match="reserved"):
        F.save_quantized(path, {"w": w}, metadata={"difforge.formats": "{}"})
    with pytest.raises(TypeError, match="str"):
        F.save_quantized(path, {"w": w}, metadata={"step": 3})
    with pytest.raises(TypeError, match="HiF8Tensor, NVFP4Tensor or Tensor"):
        F.save_quantized(path, {"w": [1, 2]})
    assert not path.exists() and os.listdir(tmp_path) == []


@pytest.mark.cuda
def test_load_onto_cuda(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = _checkpoint()
    F.save_quantized(path, {k: v.to("cuda") for k, v in tensors.items()})
    loaded = F.load_quantized(path, device="cuda")
    for name, value in loaded.items():
        assert value.device.type == "cuda"
        if isinstance(value, torch.Tensor):
            _assert_same_bits(value.cpu(), tensors[name])
        else:
            _assert_same_container(value.to("cpu"), tensors[name])
