"""Untrusted input stays data: report parameters never run code in the report's kernel, and data and configuration files
are refused in bounded memory when they would allocate without bound (bombs, caps, duplicate keys, labels out of range).

Memory is measured with tracemalloc's peak around the call (Python and NumPy allocations), never with a clock. The bombs
here are small enough that the code before these checks, which expanded them whole, stays within a few hundred MB."""

import codecs
import gzip
import json
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import tracemalloc
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch

MB = 1 << 20


def _peak(call):
    """(what `call()` raised or returned, the peak of traced memory in bytes while it ran)."""
    tracemalloc.start()
    try:
        try:
            outcome = call()
        except Exception as e:  # noqa: BLE001 - the tests look at what was raised
            outcome = e
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------------------------
# Report parameters


def _template(folder: Path) -> None:
    cells = [
        {
            "cell_type": "code",
            "id": "parameters",
            "metadata": {"tags": ["parameters"]},
            "outputs": [],
            "execution_count": None,
            "source": "anything = None\noptions = {}\nnames = ['a']\nrates = {'adam': 0.1}\nrate = 0.5",
        },
        {
            "cell_type": "code",
            "id": "results",
            "metadata": {},
            "outputs": [],
            "execution_count": None,
            "source": "from qnwb.reports import report_results\n"
            "report_results({'anything': anything, 'options': options, 'names': names})",
        },
    ]
    nb = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (folder / "demo.ipynb").write_text(json.dumps(nb))


@pytest.fixture
def demo(tmp_path, monkeypatch):
    folder = tmp_path / "templates"
    folder.mkdir()
    _template(folder)
    monkeypatch.setenv("QNWB_REPORTS", str(folder))
    return tmp_path


def _payload(marker: Path) -> str:
    """A string that, written inside a value papermill does not escape, ends the literal and creates `marker`."""
    return '"+str(open(' + json.dumps(str(marker)) + ',"w").close())+"'


def test_tuples_with_quotes_reach_the_report_as_data_and_never_run(demo):
    # Before these checks papermill wrote each of these tuples as "(...)" without escaping: the kernel ran open(marker).
    from qnwb.reports import render_report

    marker = demo / "marker"
    s = _payload(marker)
    given = {"anything": (s,), "options": {"k": [(s,)], "n": ({"k": s},)}}
    report = render_report("demo", given, out=demo / "out", progress=False)
    assert not marker.exists(), "the report's kernel ran code from a parameter"
    results = json.loads(report.results.read_text())
    assert results["anything"] == [s] and results["options"] == {"k": [[s]], "n": [{"k": s}]}


def test_a_report_folder_with_braces_is_that_folder(demo):
    # papermill reads its paths as format strings: "{anything}" in the folder would become the parameter's value
    from qnwb.reports import render_report

    out = demo / "out-{anything}"
    report = render_report("demo", {"anything": "../elsewhere"}, out=out, progress=False)
    assert (
        report.html.parent == out and report.notebook.exists() and not (demo / "elsewhere").exists()
    )


@pytest.mark.parametrize(
    "given",
    [
        {"anything": [b"x"]},  # bytes in a list: papermill writes "b'...'" unescaped
        {"anything": {"a", "b"}},  # a set
        {"anything": [frozenset({"a"})]},
        {"options": {("k",): 1}},  # non-str dict keys
        {"options": {1: "x"}},
        {"options": {"k": [{"deep": {b"x"}}]}},  # nested deep inside
        {"anything": 1j},
        {"names": ["a", ("x",)]},  # a list of str takes str elements
        {"rates": {"adam": ["x"]}},
        {"rate": math.inf},  # papermill writes float('inf'): a call, not a literal
        {"anything": [math.nan]},
    ],
)
def test_values_papermill_cannot_write_as_literals_are_refused_before_anything_runs(demo, given):
    from qnwb.reports import render_report

    marker = demo / "marker"
    given = {name: _with_payload(value, _payload(marker)) for name, value in given.items()}
    try:
        render_report("demo", given, out=demo / "out", progress=False)
        error = None
    except Exception as e:  # noqa: BLE001 - which error, below
        error = e
    assert not marker.exists(), "the report's kernel ran code from a parameter"
    assert isinstance(error, ValueError) and str(error).startswith("parameters: "), repr(error)
    assert not (demo / "out").exists()


def _with_payload(value, s: str):
    """`value` with the string "x" (or bytes b"x") replaced by the payload, so that every case would inject code."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_with_payload(v, s) for v in value)
    if isinstance(value, dict):
        return {_with_payload(k, s): _with_payload(v, s) for k, v in value.items()}
    return s if value == "x" else s.encode() if value == b"x" else value


def test_the_injected_cell_is_read_back_as_the_checked_literals(demo):
    from qnwb.reports import (
        check_literal_assignments,
        check_parameters,
        injected_parameters,
        report_names,
        template_parameters,
        template_path,
    )

    for name in report_names() + [
        "demo"
    ]:  # the demo here, and every shipped template at its defaults
        template = template_path(name)
        injected_parameters(template, check_parameters(template_parameters(template), {}))
    with pytest.raises(
        ValueError, match="anything would reach the report as the code"
    ):  # past check_parameters: caught here
        injected_parameters(template_path("demo"), {"anything": ('"+str(1)+"',)})
    with pytest.raises(ValueError, match="not a literal assignment"):
        check_literal_assignments("x = 1\nimport os", {"x": 1})
    with pytest.raises(ValueError, match="x would reach the report as True instead of 1"):
        check_literal_assignments("x = True", {"x": 1})


def test_values_are_checked_against_the_default_to_any_depth(tmp_path):
    from qnwb.reports import check_parameters, template_parameters, template_path

    defaults = {
        "seeds": [0],
        "rates": {"adam": 0.03},
        "options": {"T": 10, "name": "x"},
        "extra": {},
        "flag": False,
    }
    assert check_parameters(
        defaults,
        {"seeds": (1, 2), "rates": {"sgd": 1}, "options": {"T": 3}, "extra": {"k": [None, "a"]}},
    ) == {
        "seeds": [1, 2],
        "rates": {"sgd": 1},
        "options": {"T": 3},
        "extra": {"k": [None, "a"]},
        "flag": False,
    }
    for given, message in [
        ({"seeds": [0, True]}, r"seeds\[1\] must be a int"),
        ({"seeds": [[0]]}, r"seeds\[0\] must be a int"),
        ({"rates": {"adam": "fast"}}, r"rates\['adam'\] must be a float"),
        ({"options": {"hidden": 8}}, "options has no key 'hidden'"),
        ({"flag": 1}, "flag must be a bool"),
        ({"extra": {"k": [1, {2: 3}]}}, "dict keys must be str"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_parameters(defaults, given)
    template = tmp_path / "t.ipynb"  # a template's defaults are plain data too: no tuples
    cell = {
        "cell_type": "code",
        "id": "parameters",
        "metadata": {"tags": ["parameters"]},
        "outputs": [],
        "execution_count": None,
        "source": "sizes = (1, 2)",
    }
    template.write_text(
        json.dumps({"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5})
    )
    with pytest.raises(ValueError, match="write a list instead of a tuple"):
        template_parameters(template)
    # the shipped templates' open-ended parameters stay open: any optimizer's step size, any problem's options
    charlm, curvature = (template_parameters(template_path(n)) for n in ("charlm", "curvature"))
    check_parameters(charlm, {"optimizers": ["sgd"], "learning_rates": {"sgd": 1}})
    check_parameters(
        curvature,
        {
            "problem": "quadratic",
            "problem_options": {"n": 6, "condition": 10.0},
            "hyperparameters": {"lr": 0.1},
        },
    )


def test_command_line_values_that_exhaust_the_parser_are_one_line_errors(demo):
    from qnwb.cli import main
    from qnwb.reports import parse_value

    assert (
        parse_value("1e999") == math.inf
        and parse_value("[" * 300 + "]" * 300) == "[" * 300 + "]" * 300
    )  # the parser's own limit
    for text in ["-" * 50_000 + "1", "a" + ".b" * 30_000, "1" + "+1" * 30_000]:
        with pytest.raises(ValueError, match="nested too deeply"):
            parse_value(text)
    with pytest.raises(ValueError, match="more than the 100,000"):
        parse_value("x" * 100_001)
    for value, message in [
        ("1" + "+1" * 30_000, "nested too deeply"),
        ("1e999", "rate must be a finite number"),
        ("{1, 2}", "anything must be None, a bool"),
        ("[b'x']", r"anything\[0\] must be None"),
    ]:
        name = "rate" if value == "1e999" else "anything"
        with redirect_stderr(StringIO()) as err:
            status = main(
                ["report", "demo", "-p", name, value, "--out", str(demo / "out"), "--quiet"]
            )
        text = err.getvalue()
        assert status == 2 and text.count("\n") == 1 and len(text) < 400, text[:400]
        assert re.search(message, text), text
    assert not (demo / "out").exists()


# ---------------------------------------------------------------------------------------------
# IDX files and MNIST


def _gzip_stream(path: Path, head: bytes, zeros: int) -> Path:
    """`head` then `zeros` zero bytes, gzipped in chunks (the test never holds them in memory)."""
    with gzip.GzipFile(path, "wb", compresslevel=1, mtime=0) as f:
        f.write(head)
        for _ in range(zeros // MB):
            f.write(bytes(MB))
    return path


def test_a_gzip_bomb_is_refused_after_the_declared_bytes(tmp_path):
    from qnwb.data import read_idx

    # declares 16 bytes, inflates to 128 MB more (the code before decompressed it whole, then found trailing bytes)
    path = _gzip_stream(
        tmp_path / "bomb.gz", bytes([0, 0, 8, 1, 0, 0, 0, 16]) + bytes(range(16)), 128 * MB
    )
    assert path.stat().st_size < 2 * MB
    error, peak = _peak(lambda: read_idx(path))
    assert isinstance(error, ValueError) and "trailing bytes" in str(error) and peak < 8 * MB, (
        error,
        peak,
    )


def test_a_declared_size_over_the_cap_is_refused_before_reading(tmp_path):
    from qnwb.data import read_idx

    # 2 GiB declared (> the 1 GiB default cap), 32 MB of zeros behind the header: refused after the header
    path = _gzip_stream(
        tmp_path / "huge.gz", bytes([0, 0, 8, 1]) + struct.pack(">I", 1 << 31), 32 * MB
    )
    error, peak = _peak(lambda: read_idx(path))
    assert (
        isinstance(error, ValueError)
        and "more than max_bytes = 1,073,741,824" in str(error)
        and peak < 2 * MB
    ), (error, peak)
    overflow = tmp_path / "overflow.idx"  # 255 dimensions of 2**32 - 1: a product of 2,456 digits
    overflow.write_bytes(bytes([0, 0, 0x0E, 255]) + b"\xff" * (4 * 255))
    error, peak = _peak(lambda: read_idx(overflow))
    assert isinstance(error, ValueError) and "more than max_bytes" in str(error) and peak < 2 * MB
    small = tmp_path / "small.idx"
    small.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 100]) + bytes(100))
    with pytest.raises(ValueError, match="100 bytes, more than max_bytes = 99"):
        read_idx(small, max_bytes=99)
    assert read_idx(small, max_bytes=100).shape == (100,)


def test_truncated_and_trailing_idx_files_are_refused_without_reading_them(tmp_path):
    from qnwb.data import read_idx

    sparse = (
        tmp_path / "sparse.idx"
    )  # declares 16 bytes, is 64 MB long (sparse: no disk space): refused from its size
    with open(sparse, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 16]))
        f.truncate(64 * MB)
    error, peak = _peak(lambda: read_idx(sparse))
    assert isinstance(error, ValueError) and "trailing bytes" in str(error) and peak < 2 * MB, (
        error,
        peak,
    )
    short = tmp_path / "short.idx"  # declares 512 MB, holds 10 bytes
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 512 * MB) + bytes(10))
    error, peak = _peak(lambda: read_idx(short))
    assert isinstance(error, ValueError) and "truncated" in str(error) and peak < 2 * MB, (
        error,
        peak,
    )
    cut = tmp_path / "cut.gz"  # a gzip stream cut in the middle
    cut.write_bytes(
        gzip.compress(bytes([0, 0, 8, 1, 0, 0, 1, 0]) + bytes(range(256)), mtime=0)[:-12]
    )
    with pytest.raises(ValueError, match="truncated"):
        read_idx(cut)


def test_mnist_labels_outside_0_to_9_are_refused(tmp_path):
    from qnwb.data import load_mnist, write_idx

    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", torch.zeros(3, 28, 28, dtype=torch.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", torch.tensor([7, 10, 255], dtype=torch.uint8))
    with pytest.raises(ValueError) as info:
        load_mnist(tmp_path, "test")
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz: labels must be in 0..9" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# CIFAR-10 batches, corpora and the CURVES cache


def _python2_batch(images: np.ndarray, labels: list[int]) -> bytes:
    """A batch as the official files are: cPickle protocol 2 from Python 2 (byte strings, numpy.core, no _codecs)."""

    def string(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b

    def integer(v: int) -> bytes:
        return (
            b"K" + bytes([v])
            if 0 <= v < 256
            else b"M" + struct.pack("<H", v)
            if 0 <= v < 65536
            else b"J" + struct.pack("<i", v)
        )

    dtype = (
        b"cnumpy\ndtype\n"
        + string(b"u1")
        + b"K\x00K\x01\x87R(K\x03"
        + string(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + string(b"b")
        + b"\x87R(K\x01"
        + integer(images.shape[0])
        + integer(images.shape[1])
        + b"\x86"
        + dtype
        + b"\x89"
        + string(images.tobytes())
        + b"tb"
    )
    return (
        b"\x80\x02}("
        + string(b"batch_label")
        + string(b"training batch 1 of 5")
        + string(b"labels")
        + b"]("
        + b"".join(integer(v) for v in labels)
        + b"e"
        + string(b"data")
        + array
        + b"u."
    )


def _load_batch(tmp_path: Path, raw: bytes):
    from qnwb.data import load_cifar10

    (tmp_path / "test_batch").write_bytes(raw)
    return _peak(lambda: load_cifar10(tmp_path, "test"))


def test_cifar_batches_cannot_amplify_their_size(tmp_path):
    images = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    (x, y), _ = _load_batch(
        tmp_path, _python2_batch(images, [3, 9])
    )  # the official form still loads
    assert y.tolist() == [3, 9] and torch.equal(
        (x * 255).round().to(torch.uint8).view(2, 3072), torch.from_numpy(images)
    )

    class Encode:  # _codecs.encode(inner, "hex") twenty times: 100 bytes become 100 MB
        def __init__(self, inner):
            self.inner = inner

        def __reduce__(self):
            return codecs.encode, (self.inner, "hex")

    chain = b"x" * 100
    for _ in range(20):
        chain = Encode(chain)
    shared = (
        [1] * 10
    )  # 10 lists of the same 10 lists … seven deep: 10**7 labels for NumPy from a few hundred bytes
    for _ in range(6):
        shared = [shared] * 10
    bombs = {
        "memo": b"\x80\x02Nr"
        + struct.pack("<I", 10_000_000)
        + b".",  # 9 bytes: a memo of 10**7 entries
        "codec": pickle.dumps({b"data": chain, b"labels": []}, protocol=2),
        "labels": pickle.dumps(
            {b"data": np.zeros((10, 3072), np.uint8), b"labels": shared}, protocol=2
        ),
    }
    for name, raw in bombs.items():
        assert len(raw) < 64 * 1024
        error, peak = _load_batch(tmp_path, raw)
        assert isinstance(error, ValueError) and "test_batch" in str(error) and peak < 8 * MB, (
            name,
            error,
            peak,
        )


def test_a_crafted_numpy_object_array_in_a_cifar_batch_is_refused_not_run(tmp_path):
    # NumPy's own unpickling of an object array whose list does not match its shape crashed the interpreter
    # (a segmentation fault): run in a process of its own so that the code before these checks fails this test, not pytest.
    _reconstruct = np.zeros(1).__reduce__()[
        0
    ]  # numpy.core (NumPy 1) or numpy._core (NumPy 2) .multiarray._reconstruct

    class ObjectArray:
        def __reduce__(self):
            return _reconstruct, (np.ndarray, (0,), b"b"), (1, (1000,), np.dtype("O"), False, [])

    (tmp_path / "test_batch").write_bytes(
        pickle.dumps({b"data": ObjectArray(), b"labels": []}, protocol=2)
    )
    code = (
        "import sys\nfrom qnwb.data import load_cifar10\ntry:\n    load_cifar10(sys.argv[1], 'test')\n"
        "except ValueError as e:\n    print('refused:', e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0 and done.stdout.startswith("refused:") and "dtype" in done.stdout, (
        done.returncode,
        done.stderr[-2000:],
    )


def test_corpus_files_are_read_no_further_than_their_cap(tmp_path):
    from qnwb.data import CharCorpus, WordCorpus

    path = tmp_path / "text.txt"
    path.write_text("the cat sat on the mat. " * 100)
    assert len(CharCorpus.from_file(path, max_bytes=2400).vocabulary) == 11
    with pytest.raises(ValueError, match="more than max_bytes = 2,399 bytes"):
        CharCorpus.from_file(path, max_bytes=2399)
    with pytest.raises(ValueError, match="more than max_bytes"):
        WordCorpus.from_files(path, max_bytes=100)


def test_a_compressed_curves_cache_is_not_inflated(tmp_path, monkeypatch):
    import zipfile

    import qnwb.data
    from qnwb.data import curves_dataset

    train, test = curves_dataset(tmp_path, train=8, test=4, size=8)
    (cache,) = tmp_path.glob("curves-*.pt")
    bomb = (
        tmp_path / "bomb.pt"
    )  # the same records, deflated, one of them 64 MB of zeros: torch.load would inflate it whole
    with zipfile.ZipFile(cache) as source, zipfile.ZipFile(bomb, "w") as out:
        for info in source.infolist():
            data = bytes(64 * MB) if info.filename.endswith("data/0") else source.read(info)
            out.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    bomb.replace(cache)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(
        qnwb.data.torch,
        "load",
        lambda path, **kw: loads.append(Path(path)) or real_load(path, **kw),
    )
    with pytest.warns(UserWarning, match="not a cache of these curves"):
        again = curves_dataset(tmp_path, train=8, test=4, size=8)
    assert loads == [] and all(torch.equal(a, b) for a, b in zip(again, (train, test)))
    curves_dataset(tmp_path, train=8, test=4, size=8)  # the cache made again is read
    assert loads == [cache]


# ---------------------------------------------------------------------------------------------
# Configuration files


def _alias_bomb(levels: int, width: int = 10) -> str:
    """The billion-laughs shape: each level a list of `width` aliases of the level below, the last one as the budget."""
    lines = ["problem: addition", "optimizer: adam", "problem_options:", '  a0: &a0 ["lol"]']
    lines += [f"  a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * width)}]" for k in range(1, levels + 1)]
    return "\n".join(lines) + f"\nbudget: *a{levels}\n"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    from qnwb.runs import load_config

    # nine levels (10**9 strings once expanded) is the classic; six keep the code before these checks to ~10**6
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(6))
    error, peak = _peak(lambda: load_config(path))
    assert peak < 4 * MB, (peak, str(error)[:200])
    assert (
        isinstance(error, ValueError)
        and "line 4" in str(error)
        and "anchors and aliases" in str(error)
    ), error
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    "name, text, message",
    [
        (
            "twice.yaml",
            "problem: addition\noptimizer: adam\nbudget: {steps: 5}\noptimizer: lbfgs\n",
            "line 4, column 1: duplicate key 'optimizer'",
        ),
        (
            "nested.yaml",
            "problem: addition\noptimizer: adam\nbudget: {steps: 5, steps: 6}\n",
            "line 3, column 20: duplicate key 'steps'",
        ),
        (
            "twice.json",
            '{"problem": "addition", "optimizer": "adam", "budget": {"steps": 5}, "optimizer": "lbfgs"}',
            "duplicate key 'optimizer'",
        ),
    ],
)
def test_duplicate_keys_in_a_configuration_are_refused(tmp_path, name, text, message):
    from qnwb.runs import load_config

    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(tmp_path / name)


def test_configuration_size_and_nesting_are_capped_and_errors_are_one_line(tmp_path, monkeypatch):
    from qnwb.runs import load_config

    good = {"problem": "addition", "optimizer": "adam", "budget": {"steps": 5}}
    cases = {
        "big.json": (
            json.dumps({**good, "name": "x" * (1 << 20)}),
            "larger than max_bytes = 1,048,576 bytes",
        ),
        "deep.json": ("[" * 100_000 + "]" * 100_000, "nests too deeply to read"),
        "deep.yaml": ("[" * 100_000 + "]" * 100_000, "nests too deeply to read"),
        "nested.json": (
            json.dumps(
                {
                    **good,
                    "hyperparameters": {
                        "lr": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]
                    },
                }
            ),
            "more than max_depth = 32 deep",
        ),
        "tab.yaml": ("problem: addition\n\t- x\n", "not valid YAML at line 2, column 1"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as info:
            load_config(tmp_path / name)
        assert message in str(info.value) and "\n" not in str(info.value), (
            name,
            str(info.value)[:300],
        )
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.json").write_text(json.dumps(good))
    assert load_config("~/mine.json")["budget"] == {"steps": 5}
