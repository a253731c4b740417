"""benchmarks/run_all's markdown: the targets table reads the right figures."""

from benchmarks import run_all


def _grad_steps(ghost_s, peer_s):
  secs = {"ghost": ghost_s, "window": 2 * ghost_s, "loop": 10 * ghost_s,
          "backward 1 image": ghost_s / 50, "backward 196 images": 5 * ghost_s}
  return {"seconds": secs, "over_backward_196": {k: v / secs["backward 196 images"] for k, v in secs.items()},
          "speedup_vs_peer": {k: peer_s / v for k, v in secs.items()},
          "peer": {"best_s": peer_s}}


def test_per_patch_target_reads_the_fastest_method_not_a_backward_pass():
  res = {"by_steps": {4: _grad_steps(0.02, 0.8), 8: _grad_steps(0.4, 1.6)}}
  rows = run_all._gradients_targets(res)
  assert [r[3] for r in rows] == ["yes", "**no**"]            # 40× and 4×: the ghost method
  assert "best ghost: 40.0×" in rows[0][2] and "best ghost: 4.0×" in rows[1][2]
  md = "\n".join(run_all._gradients_md(res))
  assert "| ghost | 20 | 400 |" in md and "| PyTorch peer loop | 800 | 1,600 |" in md


def test_markdown_accepts_integer_keys_and_reports_the_targets():
  res = {"by_steps": {4: _grad_steps(0.02, 0.8)}}
  md = run_all.markdown({"gradients": {"result": res, "seconds": 1.0}}, 60.0)
  assert "could not tabulate" not in md
  assert "| per-patch gradient norms vs the PyTorch autograd loop, 4 coupling steps | ≥ 5× |" in md
  assert run_all._table([4, 8], [[1, 2]])[0] == "| 4 | 8 |"
