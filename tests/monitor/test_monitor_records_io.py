"""Typed record keys, the shared JSON Lines reader/writer, and atomic writes that keep the umask."""

import json
import math
import os
import stat
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from covshift import _io
from covshift.monitor import ActivationMonitor, MonitorConfig, flush, io, load, stats
from covshift.monitor.records import MonitorRecords, RecordKey


# -- record keys ---------------------------------------------------------------------------------
def test_record_key_strings():
    assert str(RecordKey("hidden3.act", 1, 17, True)) == "hidden3.act#1[17]@probe"
    assert str(RecordKey("fc1")) == "fc1" and str(RecordKey("fc1", channel=0)) == "fc1[0]"
    assert str(RecordKey("a.b", 2)) == "a.b#2" and str(RecordKey("x", probe=True)) == "x@probe"


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.act(self.fc(self.act(x))))


def _run(tmp_path):
    torch.manual_seed(0)
    model = Twice()
    probe = torch.randn(5, 6)
    with ActivationMonitor(model, log_dir=tmp_path, every=1, channels={"act": [2]}, probe=probe) as mon:
        for _ in range(2):
            model(torch.randn(4, 6))
            mon.step()
    return mon


def test_keys_are_typed_and_files_store_their_fields(tmp_path):
    mon = _run(tmp_path)
    want = {RecordKey("act"), RecordKey("act", channel=2), RecordKey("act", probe=True),
            RecordKey("act", channel=2, probe=True), RecordKey("act", 1), RecordKey("act", 1, 2),
            RecordKey("act", 1, None, True), RecordKey("act", 1, 2, True)}
    assert set(mon.keys) == want and mon.layers == [str(k) for k in mon.keys]
    row = json.loads((tmp_path / io.JSONL_NAME).read_text().splitlines()[0])
    assert {"module", "call", "channel", "probe"} <= set(row)
    run = load(tmp_path)
    assert run.keys == mon.keys  # rebuilt from the fields, not parsed from "act#1[2]@probe"
    assert run.table() == mon.table()
    for k in mon.keys:
        np.testing.assert_array_equal(run.histograms(k).counts, mon.histograms(str(k)).counts)
    assert run.select("act", channel=True, probe=True) == [RecordKey("act", 0, 2, True), RecordKey("act", 1, 2, True)]
    assert run.select(channel=False, probe=False) == [RecordKey("act"), RecordKey("act", 1)]
    assert run.select(call=1, channel=2, probe=False) == [RecordKey("act", 1, 2)]


def test_a_module_whose_name_looks_like_a_key_is_not_misread(tmp_path):
    # A name is never parsed: a key built from the fields stays what it is.
    rec = MonitorRecords([RecordKey("odd[3]@probe")])
    rec.add(RecordKey("odd[3]@probe"), [0], ["mean"], np.array([[1.0]]))
    assert rec.keys[0].module == "odd[3]@probe" and rec.keys[0].channel is None
    assert rec.series("odd[3]@probe", "mean")[1].tolist() == [1.0]


def test_format_1_runs_still_load_by_their_layer_strings(tmp_path):
    line = {"step": 0, "layer": "h3.act[4]@probe", "mean": 0.5, "std": 1.0, "numel": 4}
    (tmp_path / io.JSONL_NAME).write_text(json.dumps(line) + "\n")
    run = load(tmp_path)
    assert run.layers == ["h3.act[4]@probe"] and run.series("h3.act[4]@probe", "mean")[1].tolist() == [0.5]


# -- JSON Lines ----------------------------------------------------------------------------------
def test_batch_lines_are_what_json_dumps_writes():
    key = RecordKey("m", 1, 3, True)
    names = flush.stat_names((50.0,), channels=True)
    values = np.array([[0.1, 2.0, -math.inf, math.inf, math.nan, 1 / 3, 0.0, 1e-300, 0.25, 7.0]])
    b = flush.RecordBatch([key], np.array([5]), names, values, np.zeros((1, 4), np.int64), {key: np.zeros(3)},
                          [np.array([1.5, math.nan])], [np.array([0.0, 2.0])])
    (line,) = io.batch_lines(b)
    d = {"step": 5, "layer": str(key), **io.key_fields(key), **dict(zip(names, values[0].tolist()))}
    d["numel"] = 7
    d["channel_mean"], d["channel_std"] = [1.5, math.nan], [0.0, 2.0]
    assert line == json.dumps(d) + "\n"


def test_truncated_last_line_is_reported_and_skipped(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    with pytest.warns(_io.TruncatedJsonlWarning, match=r"m\.jsonl:3"):
        assert _io.read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_corrupt_line_in_the_middle_raises_with_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(_io.JsonlError, match=r"m\.jsonl:2"):
        _io.read_jsonl(p)
    # a bad last line that ends with a newline was written whole: corrupt, not truncated
    p.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(_io.JsonlError, match=r"m\.jsonl:2"):
        _io.read_jsonl(p)


def test_monitor_load_reports_a_truncated_run(tmp_path):
    _run(tmp_path)
    with open(tmp_path / io.JSONL_NAME, "a") as f:
        f.write('{"step": 9, "layer": "act", "me')
    with pytest.warns(_io.TruncatedJsonlWarning, match=io.JSONL_NAME):
        run = load(tmp_path)
    assert 9 not in run.steps("act")


def test_writer_appends_whole_lines_and_append_jsonl_matches(tmp_path):
    p = tmp_path / "x.jsonl"
    with _io.JsonlWriter(p) as w:
        w.write([{"a": 1.0, "b": math.nan}])
        w.write_lines(['{"a": 2}\n'])
    _io.append_jsonl(p, {"a": 3, "b": np.float32(0.5)})
    rows = _io.read_jsonl(p)
    assert [r["a"] for r in rows] == [1.0, 2, 3] and math.isnan(rows[0]["b"]) and rows[2]["b"] == 0.5


# -- atomic writes keep the umask ----------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_permissions_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        _io.atomic_write_json(tmp_path / "config.json", {"a": 1})
        _io.atomic_write_text(tmp_path / "report.html", "<html></html>")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for name in ("config.json", "report.html", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


def test_monitor_run_files_keep_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _run(tmp_path)
    finally:
        os.umask(old)
    for name in (io.META_NAME, io.NPZ_NAME, io.JSONL_NAME):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
