"""permsparse.ir.header: the structure of a model read without its tensor values."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from permsparse.errors import PermsparseError
from permsparse.ir.header import load_lazy, load_structure, structure_bytes

VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data", "raw_data")


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    b = helper.make_tensor("b", TensorProto.FLOAT, [8], rng.standard_normal(8).tolist())  # float_data, not raw
    shape = numpy_helper.from_array(np.array([-1, 8], dtype=np.int64), "shape")
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "s"),
                                       numpy_helper.from_array(np.array([1, 5], np.int64), "s_idx"), [8])
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(8, np.float32), "cv"))
    nodes = [const, helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"]),
             helper.make_node("Add", ["z", "c"], ["z2"]), helper.make_node("Add", ["z2", "s"], ["z3"]),
             helper.make_node("Reshape", ["z3", "shape"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 8])],
                              initializer=[w, b, shape], sparse_initializer=[sparse], doc_string="d")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    helper.set_model_props(model, {"k": "v"})
    return model


def _stripped(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        for f in VALUE_FIELDS:
            t.ClearField(f)
    for s in m.graph.sparse_initializer:
        for t in (s.values, s.indices):
            for f in VALUE_FIELDS:
                t.ClearField(f)
    return m


def test_structure_equals_the_model_without_values(tmp_path):
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    got = load_structure(path)
    assert got.SerializeToString(deterministic=True) == _stripped(model).SerializeToString(deterministic=True)
    # what callers read survives: names, dims, types, nodes (Constant values included), inputs, metadata
    assert [(t.name, list(t.dims), t.data_type) for t in got.graph.initializer] == \
        [("w", [16, 8], TensorProto.FLOAT), ("b", [8], TensorProto.FLOAT), ("shape", [2], TensorProto.INT64)]
    assert not any(t.raw_data or t.float_data or t.int64_data for t in got.graph.initializer)
    np.testing.assert_array_equal(numpy_helper.to_array(got.graph.node[0].attribute[0].t), np.ones(8, np.float32))
    assert got.metadata_props[0].key == "k" and got.graph.doc_string == "d"
    assert list(got.graph.sparse_initializer[0].dims) == [8]


def test_external_data_fields_are_kept(tmp_path):
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    got = load_structure(path)
    ref = onnx.load(str(path), load_external_data=False)
    assert got.SerializeToString(deterministic=True) == _stripped(ref).SerializeToString(deterministic=True)
    w = next(t for t in got.graph.initializer if t.name == "w")
    assert w.data_location == TensorProto.EXTERNAL and {e.key for e in w.external_data} >= {"location", "offset"}


def test_big_payload_is_skipped_not_parsed(tmp_path):
    """The walk skips a value by its length: the payload's bytes may be anything, and the result holds none of them."""
    big = numpy_helper.from_array(np.zeros((1024, 1024), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])], initializer=[big])
    data = helper.make_model(graph).SerializeToString()
    small = structure_bytes(data)
    assert len(data) > 4 * 2**20 and len(small) < 1024


@pytest.mark.parametrize("content", [b"", b"\xff\xff\xff\xff\xff", b"not an onnx model at all, just text\n"])
def test_bad_files_are_refused_in_one_line(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(PermsparseError, match="bad.onnx"):
        load_structure(path)
    with pytest.raises(PermsparseError, match="does not exist"):
        load_structure(tmp_path / "missing.onnx")


def test_lazy_model_reads_the_same_values_from_its_own_file(tmp_path):
    from permsparse.ir.external import is_external, read_external

    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    lazy = load_lazy(path, min_bytes=64)
    w = next(t for t in lazy.graph.initializer if t.name == "w")
    assert is_external(w) and dict((e.key, e.value) for e in w.external_data)["location"] == "m.onnx"
    np.testing.assert_array_equal(read_external(w, tmp_path), numpy_helper.to_array(model.graph.initializer[0]))
    # small and typed-field tensors stay inline, unchanged
    assert [t.SerializeToString() for t in lazy.graph.initializer[1:]] == \
        [t.SerializeToString() for t in model.graph.initializer[1:]]


@pytest.mark.parametrize("masked", [False, True])
def test_inline_streaming_write_round_trips(tmp_path, masked):
    """save_model(external_data=False) of a lazily read model writes one self-contained file, one tensor at a time,
    that loads as the original (transforms applied)."""
    import onnxruntime as ort

    from permsparse.ir.save import save_model

    model = _model()
    del model.graph.sparse_initializer[:]  # onnxruntime below wants a plain graph
    model.graph.node[4].input[1] = "c"
    src = tmp_path / "src.onnx"
    onnx.save(model, str(src))
    lazy = load_lazy(src, min_bytes=64)
    half = (lambda a: np.where(np.arange(a.size).reshape(a.shape) % 2 == 0, a, 0).astype(a.dtype))
    out = save_model(lazy, tmp_path / "out.onnx", external_data=False, base_dir=tmp_path,
                     transform={"w": half} if masked else None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "src.onnx"]  # no data file
    written = onnx.load(str(out))
    expect = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if masked:
        expect["w"] = half(expect["w"])
    for t in written.graph.initializer:
        assert not is_external_t(t)
        np.testing.assert_array_equal(numpy_helper.to_array(t), expect[t.name])
    onnx.checker.check_model(written)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref_w = expect["w"]
    np.testing.assert_allclose(got, (x @ ref_w + expect["b"] + 2.0).reshape(-1, 8), rtol=1e-5, atol=1e-5)


def is_external_t(t) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def test_fp32_bytes_widens_16_bit_tensors_one_by_one_and_reads_headers(tmp_path):
    """One size rule (lazy read and whole-vs-blocks check): a mixed model counts its fp16 tensors twice, its fp32
    tensors once — not the whole model twice — and a header without values gives the same number."""
    from permsparse.ir.model import fp32_bytes

    a = numpy_helper.from_array(np.ones((10, 10), np.float16), "a")  # 200 bytes -> 400
    b = numpy_helper.from_array(np.ones((10, 10), np.float32), "b")  # 400 bytes -> 400
    c = numpy_helper.from_array(np.ones(3, np.int64), "c")  # 24 bytes
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [10, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [10, 10])
    nodes = [helper.make_node("Cast", ["a"], ["a32"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "a32"], ["s"]),
             helper.make_node("Add", ["s", "b"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=[a, b, c]))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert fp32_bytes(model) == 400 + 400 + 24
    assert fp32_bytes(load_structure(path)) == 400 + 400 + 24
