"""The loaders of cyber_moe.data on the real files in ../shared/data, and on fixtures built from them as bytes."""

import re
import zipfile

import numpy as np
import pandas as pd
import pytest

from cyber_moe.data import (
    ChecksumError,
    DataError,
    engelen2021_time_test_mask,
    format_inspect,
    inspect_flows,
    load_cic_ids2017,
    load_flows,
    sha256_of,
)
from cyber_moe.schema import CIC_IDS2017, FAMILY, IS_ATTACK, SchemaError

UNSW = "unsw-nb15/UNSW_NB15_training-set.dev80.csv"
CIC = "cicids2017/Friday-WorkingHours-Afternoon-DDos.pcap_ISCX.head299.csv"
ML_DROP = ("Flow ID", "Source IP", "Source Port", "Destination IP", "Protocol", "Timestamp")


def readme_sha256(shared_data, rel):
    row = next(line for line in (shared_data / "README.md").read_text().splitlines() if f"`{rel}`" in line)
    return re.search(r"\b[0-9a-f]{64}\b", row).group(0)


def split_csv(raw: bytes):
    "Header fields and data lines of a CSV given as bytes (CRLF or LF)."
    lines = raw.replace(b"\r\n", b"\n").rstrip(b"\n").split(b"\n")
    return lines[0].split(b","), [line.split(b",") for line in lines[1:]]


def join_csv(header, rows) -> bytes:
    return b"\r\n".join(b",".join(r) for r in [header, *rows]) + b"\r\n"


@pytest.fixture(scope="module")
def cic_bytes(shared_data):
    return (shared_data / CIC).read_bytes()


@pytest.fixture(scope="module")
def ml_fixture(cic_bytes, tmp_path_factory):
    "A MachineLearningCSV-style file from the sample: identifiers and Protocol dropped, Infinity/NaN and 0x96 labels injected."
    header, rows = split_csv(cic_bytes)
    keep = [i for i, h in enumerate(header) if h.strip().decode() not in ML_DROP]
    header, rows = [header[i] for i in keep], [[r[i] for i in keep] for r in rows]
    names = [h.strip().decode() for h in header]
    fb, fp, lab = names.index("Flow Bytes/s"), names.index("Flow Packets/s"), names.index("Label")
    for i in range(0, 30, 3):
        rows[i][fb] = b"Infinity"
    for i in range(1, 30, 3):
        rows[i][fp] = b"NaN"
    for i in range(40, 47):
        rows[i][lab] = b"Web Attack \x96 Brute Force"
    for i in range(50, 52):
        rows[i][lab] = b"Web Attack \xef\xbf\xbd XSS"  # how MachineLearningCSV spells it
    path = tmp_path_factory.mktemp("ml") / "Friday-WorkingHours-Afternoon-DDos.ml.csv"
    path.write_bytes(join_csv(header, rows))
    return path, len(header)


def test_unsw_dev_file(shared_data):
    path = shared_data / UNSW
    assert sha256_of(path) == readme_sha256(shared_data, UNSW)
    df, rep = load_flows("unsw-nb15", path)
    assert len(df) == 65_866 and rep.n_rows == 65_866
    assert df[FAMILY].nunique() == 10
    assert rep.class_counts["Normal"] == 29_600 and rep.class_counts["Worms"] == 35
    assert (df[IS_ATTACK] == (df[FAMILY] != "Normal")).all()
    assert rep.files[0].sha256 == readme_sha256(shared_data, UNSW)
    assert rep.issues == []  # label and attack_cat agree in this partition
    assert df["service"].value_counts()["-"] == 37_696  # '-' (no service) kept as its own value
    assert df["dur"].dtype == np.float32
    report = inspect_flows(path)
    assert report["source"] == "unsw-nb15" and report["rows"] == 65_866
    assert report["duplicate_rows"] == 19_710  # exact duplicates once `id` is left out
    assert report["identifier_columns"] == ["id"]
    assert "19,710" in format_inspect(report)


def test_cic_sample(shared_data):
    df, rep = load_flows("cic-ids2017", shared_data / CIC)
    assert len(df) == 299 and rep.class_counts == {"BENIGN": 299}
    assert not set(CIC_IDS2017.identifiers) & set(CIC_IDS2017.features)
    assert set(CIC_IDS2017.identifiers) <= set(df.columns) and set(CIC_IDS2017.features) <= set(df.columns)
    assert "Fwd Header Length.1" not in df.columns
    assert rep.fixed[0]["unequal_rows"] == 0 and rep.fixed[0]["rows"] == 299
    assert df["Timestamp"].dtype.kind == "M"
    assert df["Timestamp"].min() == pd.Timestamp("2017-07-07 15:30")  # written '7/7/2017 3:30', captured in the afternoon
    assert rep.non_finite == {"Flow Bytes/s": {"inf": 1}, "Flow Packets/s": {"inf": 1}}
    assert np.isinf(df["Flow Bytes/s"]).sum() == 1  # kept, not zero-filled


def test_machine_learning_csv_fixture(ml_fixture):
    path, n_cols = ml_fixture
    assert n_cols == 79
    df, rep = load_flows("cic-ids2017", path)
    assert len(df) == 299
    assert rep.class_counts == {"BENIGN": 290, "Web Attack - Brute Force": 7, "Web Attack - XSS": 2}
    assert df[IS_ATTACK].sum() == 9
    assert rep.non_finite["Flow Bytes/s"]["inf"] >= 10 and rep.non_finite["Flow Packets/s"]["nan"] == 10
    assert df["Protocol"].isna().all()
    assert any(f["column"] == "Protocol" and f["rows"] == 299 for f in rep.fixed)
    assert any("Web Attack \u2013 Brute Force" in f["reason"] and f["rows"] == 7 for f in rep.fixed)
    assert rep.files[0].variant == "ml"


def test_zips(shared_data, cic_bytes, ml_fixture, tmp_path):
    z = tmp_path / "GeneratedLabelledFlows.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("TrafficLabelling /a.pcap_ISCX.csv", cic_bytes)
        zf.writestr("TrafficLabelling /b.pcap_ISCX.csv", cic_bytes)
        zf.writestr("TrafficLabelling /readme.txt", b"not a csv")
    df, rep = load_flows("cic-ids2017", z)
    assert len(df) == 598 and [f.rows for f in rep.files] == [299, 299]
    assert rep.files[0].name.endswith("!TrafficLabelling /a.pcap_ISCX.csv")
    assert rep.files[0].sha256 == sha256_of(shared_data / CIC)
    assert sorted(df["source_file"].astype(str).unique()) == [f.name for f in rep.files]
    assert len(load_flows("cic-ids2017", z, max_rows=350)[0]) == 350
    mixed = tmp_path / "mixed.zip"
    with zipfile.ZipFile(mixed, "w") as zf:
        zf.writestr("a.csv", cic_bytes)
        zf.write(ml_fixture[0], "b.csv")
    with pytest.raises(DataError, match="load one variant at a time"):
        load_flows("cic-ids2017", mixed)
    uz = tmp_path / "unsw.zip"
    with zipfile.ZipFile(uz, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(shared_data / UNSW, "UNSW_NB15_training-set.csv")
    assert len(load_flows("unsw", uz)[0]) == 65_866


def test_errors(shared_data, cic_bytes, tmp_path):
    with pytest.raises(SchemaError, match=r"missing column\(s\): Total Fwd Packets"):
        load_flows("cic-ids2017", shared_data / UNSW)
    with pytest.raises(SchemaError, match=r"head299.csv: not a unsw-nb15 flow table: \d+ missing column\(s\): spkts"):
        load_flows("unsw-nb15", shared_data / CIC)
    header, rows = split_csv(cic_bytes)
    for r in rows[:5]:
        r[-1] = b"Mirai"
    bad = tmp_path / "bad.csv"
    bad.write_bytes(join_csv(header, rows))
    with pytest.raises(SchemaError, match=r"'Mirai' \(5 rows\)"):
        load_flows("cic-ids2017", bad)
    assert inspect_flows(bad)["unknown_labels"] == {"Mirai": 5}
    trunc = tmp_path / "trunc.csv"
    trunc.write_bytes(cic_bytes[: len(cic_bytes) // 2])
    with pytest.raises(DataError, match="trunc.csv: cannot be read as a CIC-IDS2017 CSV.*truncated"):
        load_flows("cic-ids2017", trunc)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.csv: the file is empty"):
        load_flows("cic-ids2017", empty)
    head_only = tmp_path / "head.csv"
    head_only.write_bytes(cic_bytes.split(b"\n")[0] + b"\n")
    with pytest.raises(DataError, match="head.csv: has a header but no data rows"):
        load_flows("cic-ids2017", head_only)


def test_checksum_from_idsdata_registry(cic_bytes, tmp_path):
    known = tmp_path / "Friday-WorkingHours-Afternoon-DDos.pcap_ISCX.csv"  # a name the registry knows, other bytes
    known.write_bytes(cic_bytes)
    with pytest.raises(ChecksumError) as e:
        load_flows("cic-ids2017", known)
    assert "expected sha256: 1f779b4f0d78f9225554c4de53b5a2c07912b60dcd136ee4c5c1d0d2496b7cc4" in str(e.value)
    assert f"actual sha256:   {sha256_of(known)}" in str(e.value)
    rec = inspect_flows(known)["files"][0]
    assert rec["verified"] is False and rec["expected_sha256"].startswith("1f779b4f")


def test_engelen2021_release(cic_bytes, tmp_path):
    "The corrected release's names, AM/PM timestamps and 'Attempted' labels, from the sample's bytes."
    header, rows = split_csv(cic_bytes)
    rename = {
        "Source IP": "Src IP",
        "Source Port": "Src Port",
        "Destination IP": "Dst IP",
        "Destination Port": "Dst Port",
        "Total Fwd Packets": "Total Fwd Packet",
        "Total Backward Packets": "Total Bwd packets",
        "Min Packet Length": "Packet Length Min",
        "CWE Flag Count": "CWR Flag Count",
        "Init_Win_bytes_forward": "FWD Init Win Bytes",
        "act_data_pkt_fwd": "Fwd Act Data Pkts",
    }
    names = [h.strip().decode() for h in header]
    dup = [i for i, n in enumerate(names) if n == "Fwd Header Length"][1]
    header = [rename.get(n, n).encode() for i, n in enumerate(names) if i != dup]
    ts, lab = names.index("Timestamp"), names.index("Label")
    rows = [[v for i, v in enumerate(r) if i != dup] for r in rows]
    lab -= lab > dup
    for k, r in enumerate(rows):
        r[ts] = f"07/07/2017 03:{30 + k // 10:02d}:00 PM".encode()
        if k % 10 == 0:
            r[lab] = b"DoS Hulk - Attempted"
        elif k % 10 == 1:
            r[lab] = b"DoS Hulk"
    path = tmp_path / "Friday-WorkingHours.sample.csv"
    path.write_bytes(join_csv(header, rows))
    with pytest.raises(DataError, match="pass release='engelen2021'"):
        load_flows("cic-ids2017", path)
    df, rep = load_flows("cic-ids2017", path, release="engelen2021")
    assert len(df) == 299 and rep.class_counts == {"BENIGN": 269, "DoS Hulk": 30}
    assert df.loc[df["Label"] == "DoS Hulk - Attempted", IS_ATTACK].eq(0).all()
    assert df["Timestamp"].max() == pd.Timestamp("2017-07-07 15:59")
    assert any("Attempted" in f["reason"] and f["rows"] == 30 for f in rep.fixed)
    kept, rep2 = load_cic_ids2017(path, release="engelen2021", attempted="drop")
    assert len(kept) == 269 and rep2.dropped[0]["labels"] == {"DoS Hulk - Attempted": 30}
    mask = engelen2021_time_test_mask(df)
    assert 0.15 < mask.mean() < 0.25
    assert df.loc[mask, "Timestamp"].min() >= df.loc[~mask & (df["Label"] == "BENIGN"), "Timestamp"].min()
