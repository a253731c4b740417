"""The toy density: the engine really fits a density (held-out NLL falls well below the
untrained identity flow's), evaluated through the engine's hook at step 0 and later."""

from tailjax.configs import toy_flow
from tailjax import io, toy

from config_reads import track_reads, unread


def test_flow_learns_toy_density_through_the_engine(tmp_path):
  cfg = toy_flow.get_config()
  cfg.flow.num_steps = 4
  cfg.train.num_steps, cfg.train.eval_every, cfg.train.segment_steps = 300, 100, 100
  with track_reads(cfg) as reads:
    out = toy.run_toy(cfg, tmp_path / "run", progress=False)
  assert unread(cfg, reads) == []
  assert out["trained_val_nll"] < out["untrained_val_nll"] - 1.0, out   # nats per patch, C = 4
  assert sorted(map(int, out["val_nll_by_step"])) == [0, 100, 200, 300]
  assert out["steps"] == 300 and out["best_step"] in (100, 200, 300)
  logged = io.read_jsonl(tmp_path / "run" / "toy" / "metrics.jsonl")
  assert [r["step"] for r in logged] == [100, 200, 300]
  assert io.read_jsonl(tmp_path / "run" / "toy" / "metrics.jsonl")[-1]["loss"][0] < 10
