"""DDP on CPU: `make_trainer(strategy="ddp")` trains `MoELitModule` in 2 gloo processes and both ranks take part.

Lightning's DDP launcher starts the other rank by re-running the script, so the training runs in a script
file of its own (as a user's would), in a subprocess.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    import torch
    from lightning.pytorch.callbacks import Callback
    from cyber_moe.config import seed_everything
    from cyber_moe.lit import FlowDataModule, MoELitModule, class_weights_from, make_trainer
    from cyber_moe.models import MoEClassifier

    def synthetic(n, seed):
        rng = np.random.default_rng(seed)
        x_num = rng.standard_normal((n, 4)).astype(np.float32)
        x_cat = rng.integers(0, 3, (n, 2))
        x_time = rng.standard_normal((n, 5)).astype(np.float32)
        y = (x_num[:, 0] + x_time[:, 0] > 0).astype(np.int64) + (x_cat[:, 0] == 2)
        return dict(x_num=x_num, x_cat=x_cat, x_time=x_time, y_family=y, y_binary=(y > 0).astype(np.float32))

    class Record(Callback):
        "Each rank writes which training rows it saw and how the distributed run was set up."
        def __init__(self, out): self.out, self.rows = Path(out), []
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rows.extend(batch["x_num"][:, 0].tolist())
        def on_train_end(self, trainer, pl_module):
            dist = torch.distributed
            info = dict(rank=trainer.global_rank, world_size=trainer.world_size, rows=self.rows,
                        backend=dist.get_backend() if dist.is_initialized() else None,
                        val_f1=float(trainer.callback_metrics["val/family_f1_macro"]),
                        best=trainer.checkpoint_callback.best_model_path)
            (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))

    if __name__ == "__main__":
        out = sys.argv[1]
        seed_everything(0)
        train, val = synthetic(512, 0), synthetic(128, 1)
        net = MoEClassifier(n_num=4, cat_cardinalities=[3, 3], n_time=5, n_classes=3, d_token=16, n_heads=2,
                            d_temporal=16, d_gate=16, d_head=32)
        lit = MoELitModule(net, lr=3e-3, max_epochs=1, class_weights=class_weights_from(train["y_family"], 3))
        trainer = make_trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", default_root_dir=out,
                               enable_progress_bar=False, logger=False, extra_callbacks=[Record(out)])
        trainer.fit(lit, datamodule=FlowDataModule(train=train, val=val, batch_size=64))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    infos = {i["rank"]: i for i in (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1))}
    assert set(infos) == {0, 1}
    for info in infos.values():
        assert info["world_size"] == 2 and info["backend"] == "gloo"
        assert len(info["rows"]) == 256  # the DistributedSampler gives each rank half of the 512 training rows
        assert 0 <= info["val_f1"] <= 1
    # the two ranks saw different rows, together all of them
    rows0, rows1 = set(infos[0]["rows"]), set(infos[1]["rows"])
    assert not rows0 & rows1 and len(rows0 | rows1) == 512
    # metrics are synchronised across ranks, so both ranks agree on the selection metric and the checkpoint
    assert infos[0]["val_f1"] == infos[1]["val_f1"]
    assert infos[0]["best"] and infos[0]["best"] == infos[1]["best"]
    assert (tmp_path / "checkpoints").is_dir() and any((tmp_path / "checkpoints").glob("best-epoch*.ckpt"))
