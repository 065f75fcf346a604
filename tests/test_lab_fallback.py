"""Where the traffic lab cannot run, a run asking for it falls back to the simulator and says so (runs without root)."""

from cyber_moe.config import RunConfig
from cyber_moe.train import data_origin, load_source, prepare


def test_fallback_to_simulator_when_lab_unavailable(monkeypatch, tmp_path):
    import cyber_moe.lab as lab

    def unavailable(*args, **kwargs):
        raise lab.LabUnavailable("the traffic lab needs root (network namespaces, raw sockets, packet capture)")

    monkeypatch.setattr(lab, "check_available", unavailable)
    cfg = RunConfig(
        run_name="fb",
        outputs_dir=str(tmp_path),
        data={"source": "lab", "synth_n_flows": 1000, "synth_days": 1},
        split={"strategy": "session"},
    )
    df, schema, info = load_source(cfg)
    assert schema.name == "nfstream" and len(df) > 900
    assert info["fallback"]["from"] == "lab" and info["fallback"]["to"] == "synth"
    assert "needs root" in info["fallback"]["reason"] and "falling back to the simulator" in info["fallback"]["message"]
    prep = prepare(cfg, frame=df, schema=schema, source=info)
    assert prep.split.record["strategy"] == "random"  # simulated flows have no sessions
    origin = data_origin(cfg, info)
    assert origin["requested"] == "lab" and origin["used"] == "synth" and origin["fallback"]["reason"]
