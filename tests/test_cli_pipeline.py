"""The `cyber-moe pipeline` command, run as a user would: the console script in a subprocess."""

import json
import subprocess

import yaml


def run(cli, *args, cwd):
    return subprocess.run([cli, *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def test_help_lists_pipeline(cli, root):
    r = run(cli, "--help", cwd=root)
    assert r.returncode == 0 and "pipeline" in r.stdout
    r = run(cli, "pipeline", "--help", cwd=root)
    assert r.returncode == 0 and "--params" in r.stdout and "--set" in r.stdout


def test_setup_stage_writes_run_record(cli, root, tmp_path):
    out = tmp_path / "outs"
    r = run(
        cli,
        "pipeline",
        "--params",
        "params/smoke.yaml",
        "--stages",
        "00_setup",
        "--quiet",
        "--set",
        f"outputs_dir={out}",
        "--set",
        "train.max_epochs=2",
        cwd=root,
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "smoke" / "run.json").read_text())
    assert rec["status"] == "ok" and rec["run_name"] == "smoke"
    assert rec["config"]["train"]["max_epochs"] == 2
    assert rec["started_at"] <= rec["finished_at"]
    assert rec["git"]["commit"] is None or len(rec["git"]["commit"]) == 40
    assert rec["packages"]["torch"].startswith("2.13")
    assert [s["stage"] for s in rec["stages"]] == ["00_setup.ipynb"]
    assert (out / "smoke" / "notebooks" / "00_setup.ipynb").is_file()
    assert yaml.safe_load((out / "smoke" / "config.yaml").read_text())["train"]["max_epochs"] == 2


def test_bad_params_exit_nonzero_with_one_line_naming_the_key(cli, root, tmp_path):
    cases = {
        "run_name: x\ntrain:\n  max_epoch: 3\n": "train.max_epoch",
        "run_name: x\ntrain:\n  batch_size: lots\n": "train.batch_size",
        "run_name: x\nsplit:\n  strategy: shuffle\n": "split.strategy",
    }
    for text, key in cases.items():
        p = tmp_path / "bad.yaml"
        p.write_text(text)
        r = run(cli, "pipeline", "--params", str(p), "--set", f"outputs_dir={tmp_path / 'o'}", cwd=root)
        assert r.returncode == 2, (text, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and "bad.yaml" in lines[0], r.stderr
        assert not (tmp_path / "o").exists(), "no stage may start on a bad config"
    r = run(cli, "pipeline", "--params", str(tmp_path / "nope.yaml"), cwd=root)
    assert r.returncode == 2 and "not found" in r.stderr


def test_failing_stage_stops_pipeline_naming_notebook_and_cell(cli, root, tmp_path):
    import nbformat

    folder = tmp_path / "stages"
    folder.mkdir()
    for name, src in [("00_ok", "x = 1"), ("10_boom", "raise ValueError('stage exploded')"), ("20_never", "open('NEVER', 'w')")]:
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell("config_path = None")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell(src)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
        nbformat.write(nb, folder / f"{name}.ipynb")
    out = tmp_path / "outs"
    r = run(
        cli, "pipeline", "--params", "params/smoke.yaml", "--pipelines", str(folder), "--quiet", "--set", f"outputs_dir={out}", cwd=root
    )
    assert r.returncode == 1
    assert "10_boom.ipynb" in r.stderr and "ValueError" in r.stderr and "stage exploded" in r.stderr and "cell" in r.stderr
    rec = json.loads((out / "smoke" / "run.json").read_text())
    assert rec["status"] == "failed"
    assert [(s["stage"], s["status"]) for s in rec["stages"]] == [("00_ok.ipynb", "ok"), ("10_boom.ipynb", "failed")]
    assert not (out / "smoke" / "notebooks" / "20_never.ipynb").exists()
