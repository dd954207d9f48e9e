"""BEVFormer-base detection: object queries decoded from the BEV, boxes refined layer by layer.

Module names follow the reference's `pts_bbox_head.*` paths: `query_embedding`, `code_weights`,
`cls_branches_{l}_{0,1,3,4,6}`, `reg_branches_{l}_{0,2,4}` (Sequential indices, the parameter-free
layers counted), `transformer/reference_points` and `transformer/decoder/layers_{i}/{attentions_0/
attn, attentions_1, ffns_0, norms_*}`.

Decoder layer (post-norm, batch-first [B, Q, C]): self-attention over the queries (q = k = x +
query_pos, v = x), LayerNorm, deformable cross-attention on the BEV (1 level, 4 points around the
query's reference (x, y)), LayerNorm, FFN, LayerNorm. After layer l the reference is refined with
`reg_branches[l]` (in logit space) and detached before it feeds layer l + 1.

Box code (10 values per query): [cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy], centres
in metres (the reference's normalize_bbox ignores pc_range), sizes and velocities as regressed.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uniscene_jax import geometry
from uniscene_jax.detection.boxes import CODE_WEIGHTS
from uniscene_jax.models.bev_attention import _dense, _sampling_projections
from uniscene_jax.models.bev_encoder import FFN
from uniscene_jax.models.heads import BEVHead, HeadConfig, PerceptionTransformer
from uniscene_jax.models.initializers import normal, torch_default_bias, xavier
from uniscene_jax.ops.deformable_attention import ms_deform_attn


@dataclasses.dataclass(frozen=True)
class DetectionHeadConfig:
  """BEVFormerHead + DetectionTransformerDecoder settings (embed dims come from the encoder).

  Attributes:
    num_query: object queries; query_embedding is [num_query, 2 * C] (query_pos | query).
    num_classes: sigmoid classes (nuScenes' 10 detection classes).
    code_size: box code length (10, see the module docstring).
    num_layers: decoder layers, each with its own cls and reg branch.
    num_heads, num_points, ffn_dims, dropout: decoder layer sizes (the BEV is one level).
    code_weights: the loss's per-code weights, a frozen parameter (counted, never trained).
    pc_range: (x0, y0, z0, x1, y1, z1) that maps the sigmoid centres to metres.
    cls_bias_prior: the last cls bias is -log((1 - p) / p) with this p.
  """

  num_query: int = 900
  num_classes: int = 10
  code_size: int = 10
  num_layers: int = 6
  num_heads: int = 8
  num_points: int = 4
  ffn_dims: int = 512
  dropout: float = 0.1
  code_weights: tuple[float, ...] = CODE_WEIGHTS
  pc_range: tuple[float, ...] = geometry.PC_RANGE
  cls_bias_prior: float = 0.01


def inverse_sigmoid(x: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
  """log(x / (1 - x)) with x clamped to [0, 1] and both terms to at least eps (the reference's)."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


def refine_reference(reg: jnp.ndarray, reference: jnp.ndarray) -> jnp.ndarray:
  """reg [..., code_size] regression, reference [..., 3] normalised (x, y, z) -> the new
  normalised reference: sigmoid(reg[0:2] + logit(ref[0:2])), sigmoid(reg[4] + logit(ref[2]))."""
  inv = inverse_sigmoid(reference)
  return jax.nn.sigmoid(
    jnp.concatenate([reg[..., 0:2] + inv[..., 0:2], reg[..., 4:5] + inv[..., 2:3]], -1)
  )


def box_codes(reg: jnp.ndarray, reference: jnp.ndarray, pc_range) -> jnp.ndarray:
  """reg [..., 10] and the layer's input reference [..., 3] -> box codes [..., 10] with the centre
  (codes 0, 1, 4) in metres of the BEV frame, the other codes as regressed."""
  ref = refine_reference(reg, reference)
  lo = jnp.asarray(pc_range[:3], jnp.float32)
  hi = jnp.asarray(pc_range[3:], jnp.float32)
  centre = ref * (hi - lo) + lo
  return jnp.concatenate([centre[..., 0:2], reg[..., 2:4], centre[..., 2:3], reg[..., 5:]], -1)


def torch_default_kernel(key, shape, dtype=jnp.float32):
  """torch Linear's default weight init, U(+-1/sqrt(fan_in)), for a Flax kernel [in, out]."""
  bound = 1.0 / np.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _norm(name: str, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


class MultiheadAttentionCore(nn.Module):
  """torch nn.MultiheadAttention (`attn`): in_proj packs q | k | v as torch does, so its Flax
  kernel [C, 3C] is the transpose of `in_proj_weight` [3C, C] (xavier over the packed matrix, as
  the reference initialises it); biases start at 0. Batch-first: q, k, v [B, S, C] -> [B, S, C]."""

  embed_dims: int
  num_heads: int
  attn_drop: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q, k, v, train: bool = False):
    c, heads = self.embed_dims, self.num_heads
    w = self.param('in_proj_kernel', xavier, (c, 3 * c), jnp.float32).astype(self.dtype)
    bias = self.param('in_proj_bias', nn.initializers.zeros, (3 * c,), jnp.float32)
    bias = bias.astype(self.dtype)
    b, s, _ = q.shape
    q, k, v = (
      (x.astype(self.dtype) @ w[:, i * c : (i + 1) * c] + bias[i * c : (i + 1) * c]).reshape(
        b, -1, heads, c // heads
      )
      for i, x in enumerate((q, k, v))
    )
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits / np.sqrt(c // heads), -1)
    probs = nn.Dropout(self.attn_drop, deterministic=not train)(probs)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), v).reshape(b, s, c)
    return _dense(c, 'out_proj', self.dtype)(out)


class MultiheadAttention(nn.Module):
  """mmcv MultiheadAttention on the queries: x + dropout(attn(x + pos, x + pos, x))."""

  embed_dims: int
  num_heads: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, pos, train: bool = False):
    qk = x + pos
    out = MultiheadAttentionCore(
      self.embed_dims, self.num_heads, self.dropout, self.dtype, name='attn'
    )(qk, qk, x, train)
    return x + nn.Dropout(self.dropout, deterministic=not train)(out)


class CustomMSDeformableAttention(nn.Module):
  """Deformable cross-attention of object queries on the BEV (one level).

  Args (call):
    x: [B, Q, C] queries; pos: [B, Q, C] query_pos (added to the query, not the value).
    value: [B, HW, C] BEV features (rows q = h * W + w).
    ref_xy: [B, Q, 2] normalised (x, y) reference in the BEV.
  Returns [B, Q, C]: x + dropout(output_proj(MSDA)); offsets are BEV cells, divided by (W, H).
  """

  bev_h: int
  bev_w: int
  embed_dims: int = 256
  num_heads: int = 8
  num_points: int = 4
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, pos, value, ref_xy, train: bool = False):
    b, q, c = x.shape
    heads, points = self.num_heads, self.num_points
    v = _dense(self.embed_dims, 'value_proj', self.dtype)(value.astype(self.dtype))
    v = v.reshape(b, value.shape[1], heads, c // heads)
    off, aw = _sampling_projections(x + pos, heads, 1, points, self.dtype)
    aw = jax.nn.softmax(aw.reshape(b, q, heads, 1, points), -1)
    scale = jnp.asarray([self.bev_w, self.bev_h], jnp.float32)
    off = off.reshape(b, q, heads, 1, points, 2) / scale
    loc = ref_xy.astype(jnp.float32)[:, :, None, None, None, :] + off
    out = ms_deform_attn(v, ((self.bev_h, self.bev_w),), loc, aw.astype(v.dtype))
    out = _dense(self.embed_dims, 'output_proj', self.dtype)(out)
    return x + nn.Dropout(self.dropout, deterministic=not train)(out)


class DetrDecoderLayer(nn.Module):
  config: DetectionHeadConfig
  bev_h: int
  bev_w: int
  embed_dims: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, pos, value, ref_xy, train: bool = False):
    cfg, c = self.config, self.embed_dims
    x = MultiheadAttention(c, cfg.num_heads, cfg.dropout, self.dtype, name='attentions_0')(
      x, pos, train
    )
    x = _norm('norms_0', self.dtype)(x)
    x = CustomMSDeformableAttention(
      self.bev_h,
      self.bev_w,
      c,
      cfg.num_heads,
      cfg.num_points,
      cfg.dropout,
      self.dtype,
      name='attentions_1',
    )(x, pos, value, ref_xy, train)
    x = _norm('norms_1', self.dtype)(x)
    x = FFN(c, cfg.ffn_dims, cfg.dropout, self.dtype, name='ffns_0')(x, train)
    return _norm('norms_2', self.dtype)(x)


class DetectionTransformerDecoder(nn.Module):
  """Decoder layers with iterative box refinement.

  Args (call):
    query, query_pos: [B, Q, C]; value: [B, HW, C] BEV; reference: [B, Q, 3] normalised (x, y, z).
    reg_branch: (layer, x [B, Q, C]) -> [B, Q, code_size], the head's regression branch.
  Returns (hs [L, B, Q, C], references [L, B, Q, 3] after each layer (detached), reg [L, B, Q,
  code_size] float32, the branch outputs on hs, with gradients).
  """

  config: DetectionHeadConfig
  bev_h: int
  bev_w: int
  embed_dims: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, query_pos, value, reference, reg_branch: Callable, train=False):
    x, ref = query, reference.astype(jnp.float32)
    hs, refs, regs = [], [], []
    for i in range(self.config.num_layers):
      x = DetrDecoderLayer(
        self.config, self.bev_h, self.bev_w, self.embed_dims, self.dtype, name=f'layers_{i}'
      )(x, query_pos, value, ref[..., :2], train)
      reg = reg_branch(i, x).astype(jnp.float32)
      # The next layer sees the refined reference but no gradient through it (as the reference).
      ref = jax.lax.stop_gradient(refine_reference(reg, ref))
      hs.append(x)
      refs.append(ref)
      regs.append(reg)
    return jnp.stack(hs), jnp.stack(refs), jnp.stack(regs)


class DetectionTransformer(PerceptionTransformer):
  """PerceptionTransformer of the detector: the encoder plus `reference_points` and `decoder`
  (no occupancy layers: config.occupancy must be None)."""

  det: DetectionHeadConfig = DetectionHeadConfig()

  def setup(self):
    super().setup()
    enc = self.config.encoder
    self.reference_points = nn.Dense(
      3, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=xavier
    )
    self.decoder = DetectionTransformerDecoder(
      self.det, enc.bev_h, enc.bev_w, enc.embed_dims, self.dtype
    )

  def decode(self, bev, query_embed, reg_branch, train=False):
    """bev [B, HW, C]; query_embed [Q, 2C] -> (hs, init_reference [B, Q, 3], refs, regs)."""
    c = self.config.encoder.embed_dims
    b = bev.shape[0]
    query_embed = query_embed.astype(self.dtype)
    query_pos = jnp.broadcast_to(query_embed[None, :, :c], (b, query_embed.shape[0], c))
    query = jnp.broadcast_to(query_embed[None, :, c:], query_pos.shape)
    init_ref = jax.nn.sigmoid(self.reference_points(query_pos).astype(jnp.float32))
    hs, refs, regs = self.decoder(
      query, query_pos, bev.astype(self.dtype), init_ref, reg_branch, train
    )
    return hs, init_ref, refs, regs


class BEVFormerHead(BEVHead):
  """`pts_bbox_head` of the detector: the BEV head plus object queries, decoder and branches.

  The six cls and six reg branches start identical (the reference deep-copies one of each): all
  branches draw their initial values from one shared key. Linear layers keep torch's default
  init; the last cls bias is -log((1 - p) / p). `code_weights` is a parameter that the optimiser
  leaves frozen (optim.FROZEN_PATTERNS), kept so that checkpoints carry it as the reference's do.
  """

  det: DetectionHeadConfig = DetectionHeadConfig()

  def make_transformer(self):
    if self.config.occupancy is not None:
      raise ValueError('the detector takes HeadConfig.occupancy=None (no occupancy layers)')
    return DetectionTransformer(self.config, self.dtype, self.det)

  def setup(self):
    super().setup()
    det, c = self.det, self.config.encoder.embed_dims
    if len(det.code_weights) != det.code_size:
      raise ValueError(
        f'DetectionHeadConfig.code_weights has {len(det.code_weights)} values, '
        f'code_size is {det.code_size}'
      )
    self.code_weights = self.param(
      'code_weights', lambda *_: jnp.asarray(det.code_weights, jnp.float32)
    )
    self.query_embedding = nn.Embed(
      det.num_query, 2 * c, embedding_init=normal, param_dtype=jnp.float32
    )
    shared = self.make_rng('params') if self.is_initializing() else None
    prior = float(-np.log((1 - det.cls_bias_prior) / det.cls_bias_prior))

    def dense(features, fan_in, tag, bias_init=None):
      # Every branch's layer `tag` draws from the same key: the six clones start identical.
      def same(init, salt):
        # Outside init Flax still traces initialisers (shape checks): any key does then.
        return lambda key, shape, dtype=jnp.float32: init(
          jax.random.fold_in(key if shared is None else shared, salt), shape, dtype
        )

      return nn.Dense(
        features,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=same(torch_default_kernel, 2 * tag),
        bias_init=bias_init or same(torch_default_bias(fan_in), 2 * tag + 1),
      )

    def ln():
      return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32)

    cls_bias = nn.initializers.constant(prior)
    self.cls_branches = [
      {
        '0': dense(c, c, 0),
        '1': ln(),
        '3': dense(c, c, 1),
        '4': ln(),
        '6': dense(det.num_classes, c, 2, cls_bias),
      }
      for _ in range(det.num_layers)
    ]
    self.reg_branches = [
      {'0': dense(c, c, 3), '2': dense(c, c, 4), '4': dense(det.code_size, c, 5)}
      for _ in range(det.num_layers)
    ]

  def cls_branch(self, layer: int, x):
    br = self.cls_branches[layer]
    x = nn.relu(br['1'](br['0'](x)))
    return br['6'](nn.relu(br['4'](br['3'](x))))

  def reg_branch(self, layer: int, x):
    br = self.reg_branches[layer]
    return br['4'](nn.relu(br['2'](nn.relu(br['0'](x)))))

  def detect(self, bev, train: bool = False) -> dict:
    """bev [B, HW, C] -> {'cls': [L, B, Q, classes] logits, 'box': [L, B, Q, code_size]} float32.

    Layer l's box uses the reference that layer l was given: the initial one (with gradient into
    reference_points and query_pos) for l = 0, the detached refinement of layer l - 1 after.
    """
    hs, init_ref, refs, regs = self.transformer.decode(
      bev, self.query_embedding.embedding, self.reg_branch, train
    )
    ref_in = jnp.concatenate([init_ref[None], refs[:-1]], 0)
    cls = jnp.stack([self.cls_branch(i, hs[i]) for i in range(hs.shape[0])])
    box = box_codes(regs, ref_in, self.det.pc_range)
    return {'cls': cls.astype(jnp.float32), 'box': box}


__all__ = [
  'BEVFormerHead',
  'CustomMSDeformableAttention',
  'DetectionHeadConfig',
  'DetectionTransformer',
  'DetectionTransformerDecoder',
  'HeadConfig',
  'box_codes',
  'inverse_sigmoid',
  'refine_reference',
]
