"""`infini train passkey`: a short run writes a loadable checkpoint and its log; bad setups fail clearly."""

import json

from click.testing import CliRunner

from infini_deploy.models.checkpoint import load_checkpoint
from infini_deploy.tools.cli import cli


def test_train_passkey_writes_checkpoint_and_log(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "passkey", str(out), "--preset", "tiny", "--steps", "2", "--batch", "1",
                                 "--min-segments", "6", "--max-segments", "6", "--threads", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "trained 2 steps" in r.output
    model = load_checkpoint(out)
    assert model.config.segment_len == 64
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps_done"] == 2 and log["train_config"]["beta_lr"] == 0.01 and log["log"][-1]["step"] == 2
    again = CliRunner().invoke(cli, ["train", "passkey", str(out), "--preset", "tiny", "--steps", "1"])
    assert again.exit_code == 2 and "--force" in again.output


def test_train_passkey_too_short_segments_fail_clearly(tmp_path):
    r = CliRunner().invoke(cli, ["train", "passkey", str(tmp_path / "x"), "--preset", "tiny", "--steps", "1"])
    assert r.exit_code == 2
    assert "too short for a passkey prompt" in r.output and "--min-segments" in r.output
