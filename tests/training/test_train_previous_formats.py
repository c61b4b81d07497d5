"""A training checkpoint written before the restructure (commit b90c1e2, tests/fixtures/b90c1e2/train: step 2 of
configs/tiny_cpu.yaml with max_steps=4, save_steps=2, and that run's metrics.jsonl) resumes with today's code and
reproduces the earlier run's steps 3 and 4."""

import json
import os
import shutil

import numpy as np
from conftest import REPO
from train_helpers import read_metrics, train_main

OLD = os.path.join(REPO, "tests", "fixtures", "b90c1e2", "train")
FLOATS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "learning_rate")


def test_a_training_checkpoint_from_the_previous_commit_resumes(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(os.path.join(OLD, "checkpoints"), out / "checkpoints")
    args = ["--config", os.path.join(REPO, "configs", "tiny_cpu.yaml"), f"output_dir={out}", "max_steps=4",
            "save_steps=2", "export=false", "resume_from_checkpoint=true"]
    assert train_main(args) == 0
    resumed = read_metrics(out)
    with open(os.path.join(OLD, "metrics.jsonl")) as f:
        before = [json.loads(line) for line in f]
    assert [m["step"] for m in resumed] == [3, 4]
    for got, want in zip(resumed, before[2:], strict=True):
        assert got["label_tokens"] == want["label_tokens"] and got["tokens"] == want["tokens"]
        for key in FLOATS:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
