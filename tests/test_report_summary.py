"""The summary report: one row per claim of the newest results of every report under a folder, linked to its HTML."""

import json

from qnwb.reports import claim, render_report


def test_the_summary_lists_the_newest_claims_of_each_report_with_links(tmp_path):
    rendered = tmp_path / "rendered"
    (rendered / "old").mkdir(parents=True)
    old = claim("an old claim", "1", "2", "not reproduced", "superseded")
    (rendered / "old" / "table5-20260101-000000.json").write_text(json.dumps({"claims": [old]}))
    new = [claim("NAG beats CM", "0.00025 < 0.036", "0.1 < 0.3", "same ordering", "ranges overlap")]
    (rendered / "table5-20260102-000000.json").write_text(json.dumps({"claims": new}))
    (rendered / "table5-20260102-000000.html").write_text("<html></html>")
    (rendered / "figure3-20260102-000000.json").write_text(
        json.dumps({"results": []})
    )  # rendered before claims
    report = render_report(
        "summary", {"folder": str(rendered)}, out=tmp_path / "out", progress=False
    )
    results = json.loads(report.results.read_text())
    rows = results["claims_found"]
    assert [row["claim"] for row in rows] == [
        "figure3: no claims recorded in figure3-20260102-000000.json",
        "NAG beats CM",
    ]
    assert rows[1]["status"] == "same ordering"
    assert rows[1]["report"] == "[table5](../rendered/table5-20260102-000000.html)"
    assert results["sources"]["figure3"]["html"] is None
    assert "NAG beats CM" in report.html.read_text()


def test_relative_paths_in_parameters_mean_the_callers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    mine = [claim("found from the caller's folder", "1", "1", "reproduced", "same value")]
    (tmp_path / "mine" / "table5-20260102-000000.json").write_text(json.dumps({"claims": mine}))
    report = render_report("summary", {"folder": "mine"}, out="out", progress=False)
    assert [r["claim"] for r in json.loads(report.results.read_text())["claims_found"]] == [
        "found from the caller's folder"
    ]
