"""Identity embeddings for study B: an ArcFace embedder trained on scikit-learn digits.

The study's bags hold 256-d L2-normalised ArcFace face embeddings. With no
network at run time, the embedded default replaces faces by the real
handwritten digits of ``sklearn.datasets.load_digits`` (1797 images, 8×8,
about 180 per class) with *digit class = identity*:

* An MLP embedder with an ArcFace head (additive angular margin 0.4, scale 30,
  ``tailjax.losses.arcface_loss``) is trained on the *training identities*
  (default digits 0–5) only.
* Bags are built from the *held-out identities* (default 6–9), which the
  embedder never saw, as with a face model applied to new people. Embeddings
  of unseen identities cluster less tightly than those of the training ones,
  so contamination is detectable but not trivially so.

Only 10 identities exist: with 4 held out, a positive bag mixes its majority
identity with one of 3 others. ``heldout_classes`` is configurable; more
held-out identities give more varied bags but a weaker embedder (fewer
training identities). ``embedding_quality`` reports how well the held-out
identities separate, so the report can say how strong the features are.

Users can bring their own embeddings: ``load_embeddings(path)`` reads an
``.npz`` with ``embeddings [n, d]`` and ``identity [n]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tailjax import io as tio
from tailjax import losses
from tailjax import train as train_lib
from tailjax.io import first_few

DEFAULT_TRAIN_CLASSES = (0, 1, 2, 3, 4, 5)
DEFAULT_HELDOUT_CLASSES = (6, 7, 8, 9)


class IdentityEmbeddings(NamedTuple):
  """Instances for bagging: ``embeddings_NxD`` (float32), ``identity_N`` (int), provenance."""
  embeddings_NxD: np.ndarray
  identity_N: np.ndarray
  info: dict


@dataclasses.dataclass(frozen=True)
class ArcFaceSettings:
  """How the digits embedder is trained (all fields enter the cache key)."""
  train_classes: tuple[int, ...] = DEFAULT_TRAIN_CLASSES
  heldout_classes: tuple[int, ...] = DEFAULT_HELDOUT_CLASSES
  hidden_dim: int = 256
  embed_dim: int = 256
  steps: int = 600
  batch_size: int = 128
  learning_rate: float = 1e-3
  margin: float = 0.4
  scale: float = 30.0
  seed: int = 0
  fast_compile: bool = False  # lower XLA's optimisation level (tiny smoke runs are compile-bound)

  def validate(self) -> None:
    tr, ho = set(self.train_classes), set(self.heldout_classes)
    bad = sorted(c for c in tr | ho if not 0 <= c <= 9)
    if bad:
      raise ValueError(f"data.embedder.train_classes / data.embedder.heldout_classes must be digits 0-9; got {first_few(bad)}")
    if tr & ho:
      raise ValueError(f"data.embedder.train_classes and data.embedder.heldout_classes overlap: {sorted(tr & ho)}")
    if len(tr) < 2:
      raise ValueError(f"data.embedder.train_classes needs >= 2 classes for ArcFace; got {sorted(tr)}")
    if len(ho) < 2:
      raise ValueError(f"data.embedder.heldout_classes needs >= 2 identities to contaminate; got {sorted(ho)}")
    if self.steps < 1 or self.batch_size < 2:
      raise ValueError(f"data.embedder.steps must be >= 1 and data.embedder.batch_size >= 2; got {self.steps}/{self.batch_size}")


class DigitEmbedder(nn.Module):
  """MLP on the 64 pixels (scaled to [0, 1]) → L2-normalised embedding."""
  hidden_dim: int = 256
  embed_dim: int = 256

  @nn.compact
  def __call__(self, pixels_Bx64):
    h = nn.relu(nn.Dense(self.hidden_dim)(pixels_Bx64))
    h = nn.relu(nn.Dense(self.hidden_dim)(h))
    e = nn.Dense(self.embed_dim)(h)
    return e / (jnp.linalg.norm(e, axis=-1, keepdims=True) + 1e-12)


def train_arcface(pixels_Nx64: np.ndarray, labels_N: np.ndarray, s: ArcFaceSettings):
  """Trains ``DigitEmbedder`` + ArcFace class centres with Adam as one jitted scan.

  Uses the shared training pieces: ``train.make_optimizer`` (Adam, lr
  ``s.learning_rate``), ``train.create_state`` and the pure
  ``train.make_train_step``. Labels must be 0..C−1. The mini-batch of step t
  (``state.step``) is drawn without replacement with ``fold_in(key, t)``, so
  the run is a pure function of ``s.seed``.
  Returns ``(embedder_params, centres_CxE, loss_T)``.
  """
  n_classes = int(labels_N.max()) + 1
  model = DigitEmbedder(s.hidden_dim, s.embed_dim)
  key = jax.random.PRNGKey(s.seed)
  k_init, k_centres, k_batches = jax.random.split(key, 3)
  params = {
      "embedder": model.init(k_init, jnp.zeros((1, pixels_Nx64.shape[1]), jnp.float32)),
      "centres": jax.random.normal(k_centres, (n_classes, s.embed_dim), jnp.float32),
  }
  tx = train_lib.make_optimizer({"name": "adam", "learning_rate": s.learning_rate})
  x_all = jnp.asarray(pixels_Nx64, jnp.float32)
  y_all = jnp.asarray(labels_N, jnp.int32)
  batch = min(s.batch_size, x_all.shape[0])

  def loss_fn(p, batch_xy, hparams, key):
    del hparams, key  # no loss hyperparameters, no dropout
    x_Bx64, y_B = batch_xy
    emb_BxE = model.apply(p["embedder"], x_Bx64)
    return losses.arcface_loss(emb_BxE, p["centres"], y_B, s.margin, s.scale), {}

  train_step = train_lib.make_train_step(loss_fn)

  def step(state, _):
    idx_B = jax.random.choice(jax.random.fold_in(k_batches, state.step), x_all.shape[0], (batch,),
                              replace=False)
    state, metrics = train_step(state, (x_all[idx_B], y_all[idx_B]), k_batches)
    return state, metrics["loss"]

  @jax.jit(compiler_options={"xla_backend_optimization_level": 0} if s.fast_compile else None)
  def run(p):
    state = train_lib.create_state(model.apply, p, tx).replace(step=jnp.int32(0))
    state, loss_T = jax.lax.scan(step, state, None, length=s.steps)
    return state.params, loss_T

  params, loss_T = run(params)
  return params["embedder"], params["centres"], np.asarray(loss_T)


def embedding_quality(emb_NxD: np.ndarray, identity_N: np.ndarray) -> dict:
  """How separable the identities are: cosine statistics and nearest-centroid accuracy.

  ``intra_cos``/``inter_cos``: mean cosine similarity over same-/different-
  identity pairs; ``ncc_accuracy``: leave-one-out nearest-centroid accuracy
  (the instance itself is removed from its own centroid).
  """
  x = emb_NxD / np.linalg.norm(emb_NxD, axis=1, keepdims=True)
  ids = np.unique(identity_N)
  cos = x @ x.T
  same = identity_N[:, None] == identity_N[None, :]
  off = ~np.eye(len(x), dtype=bool)
  sums = np.stack([x[identity_N == c].sum(0) for c in ids])
  counts = np.array([(identity_N == c).sum() for c in ids], np.float64)
  own = np.searchsorted(ids, identity_N)
  cent = np.repeat(sums[None], len(x), 0)
  cent[np.arange(len(x)), own] -= x
  cnt = np.repeat(counts[None], len(x), 0)
  cnt[np.arange(len(x)), own] -= 1
  cent = cent / np.maximum(cnt, 1)[:, :, None]
  pred = ids[np.argmax(np.einsum("nd,ncd->nc", x, cent), axis=1)]
  return {
      "intra_cos": float(cos[same & off].mean()),
      "inter_cos": float(cos[~same].mean()),
      "ncc_accuracy": float((pred == identity_N).mean()),
      "n": int(len(x)),
      "identities": ids.tolist(),
  }


def _cache_key(s: ArcFaceSettings, pixels: np.ndarray, labels: np.ndarray) -> str:
  h = hashlib.sha256()
  h.update(json.dumps(dataclasses.asdict(s), sort_keys=True).encode())
  h.update(np.ascontiguousarray(pixels, np.float32).tobytes())
  h.update(np.ascontiguousarray(labels, np.int64).tobytes())
  h.update(jax.__version__.encode())  # numerics of the trainer may differ across versions
  return h.hexdigest()[:16]


def digits_embeddings(settings: ArcFaceSettings | None = None, *,
                      cache_dir: str | os.PathLike | None = None) -> IdentityEmbeddings:
  """Embeddings of the held-out digit identities from an ArcFace embedder.

  The embedder is trained on ``settings.train_classes`` only; the returned
  instances are all images of ``settings.heldout_classes`` (never seen in
  training), with ``identity`` = digit. With ``cache_dir`` the result is stored
  atomically as ``digits_arcface_<key>.npz``, keyed by the settings and data,
  and reused on the next call.
  """
  from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

  s = settings or ArcFaceSettings()
  s.validate()
  digits = load_digits()
  pixels = (digits.data / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int64)
  key = _cache_key(s, pixels, labels)
  path = Path(cache_dir) / f"digits_arcface_{key}.npz" if cache_dir else None
  if path is not None and path.exists():
    try:
      with np.load(path) as z:
        return IdentityEmbeddings(z["embeddings"].astype(np.float32), z["identity"].astype(np.int64),
                                  json.loads(str(z["info"])))
    except (OSError, ValueError, KeyError):
      pass  # a damaged cache entry is rebuilt below and replaced atomically

  train_mask = np.isin(labels, s.train_classes)
  remap = {c: i for i, c in enumerate(sorted(s.train_classes))}
  y_train = np.array([remap[c] for c in labels[train_mask]], np.int64)
  emb_params, centres, loss_T = train_arcface(pixels[train_mask], y_train, s)
  model = DigitEmbedder(s.hidden_dim, s.embed_dim)
  embed = jax.jit(lambda x: model.apply(emb_params, x))

  e_train = np.asarray(embed(pixels[train_mask]))
  c = np.asarray(centres) / np.linalg.norm(np.asarray(centres), axis=1, keepdims=True)
  held_mask = np.isin(labels, s.heldout_classes)
  e_held = np.asarray(embed(pixels[held_mask])).astype(np.float32)
  id_held = labels[held_mask]
  info: dict[str, Any] = {
      "source": "sklearn load_digits + ArcFace MLP embedder",
      "settings": dataclasses.asdict(s),
      "cache_key": key,
      "arcface_final_loss": float(loss_T[-20:].mean()),
      "train_identity_accuracy": float((np.argmax(e_train @ c.T, 1) == y_train).mean()),
      "train_quality": embedding_quality(e_train, y_train),
      "heldout_quality": embedding_quality(e_held, id_held),
  }
  if path is not None:
    with tio.atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, embeddings=e_held, identity=id_held, info=np.array(tio.to_json(info)))
  return IdentityEmbeddings(e_held, id_held, info)


def load_embeddings(path: str | os.PathLike, *, normalize: bool = True) -> IdentityEmbeddings:
  """Reads user embeddings: an ``.npz`` with ``embeddings [n, d]`` and ``identity [n]``.

  Raises ValueError/FileNotFoundError naming the file and key on a missing
  file or key, wrong shapes, NaN/Inf, zero vectors (with ``normalize``) or
  fewer than 2 identities. With ``normalize`` rows are L2-normalised, as
  ArcFace embeddings are.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"embeddings file not found: {path}")
  z = tio.read_npz(path)
  missing = [k for k in ("embeddings", "identity") if k not in z]
  if missing:
    raise ValueError(f"{path}: missing key(s) {missing}; found {first_few(sorted(z), 8)}")
  emb = np.asarray(z["embeddings"], np.float32)
  ident = z["identity"]
  if emb.ndim != 2 or ident.ndim != 1 or emb.shape[0] != ident.shape[0]:
    raise ValueError(f"{path}: need embeddings [n, d] and identity [n]; got {emb.shape} and {ident.shape}")
  bad = np.flatnonzero(~np.isfinite(emb).all(1))
  if bad.size:
    raise ValueError(f"{path}: 'embeddings' has NaN/Inf in {bad.size} row(s): {first_few(bad.tolist())}")
  if normalize:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
      raise ValueError(f"{path}: 'embeddings' has {zero.size} all-zero row(s): {first_few(zero.tolist())}")
    emb = emb / norms
  _, ident_int = np.unique(ident, return_inverse=True)  # string or int ids → 0..K−1
  if ident_int.max(initial=-1) < 1:
    raise ValueError(f"{path}: 'identity' needs at least 2 distinct identities")
  return IdentityEmbeddings(emb, ident_int.astype(np.int64),
                            {"source": str(path), "heldout_quality": embedding_quality(emb, ident_int)})


def settings_from_config(cfg: Any) -> ArcFaceSettings:
  """ArcFaceSettings from a ``config.data.embedder`` ConfigDict/dict (missing fields default)."""
  get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
  kw = {}
  for f in dataclasses.fields(ArcFaceSettings):
    v = get(f.name, None)
    if v is not None:
      kw[f.name] = tuple(int(c) for c in v) if f.name.endswith("classes") else v
  return ArcFaceSettings(**kw)
