r"""Benchmark: sampling ops and convolutions in JAX against PyTorch, side by side in one run.

    python -m uniscene_jax.tools.bench_ops [--quick] [--repeats N] [--only NAME ...]

For each shape it prints the median forward and forward+backward times of the JAX op (jitted,
compiled before timing) and of the PyTorch reference (tests/reference/ops_torch.py, with torch's
own thread pool), and the JAX / torch ratios. The references live in tests/reference/, so run this
from the repository root. Inputs are random: values N(0, 1), locations uniform in [-0.1, 1.1]
(some points fall outside the maps), attention weights uniform in [0, 1].

Convolutions (the backbone's and the FPN's, at the base shapes) run twice on the JAX side: through
`ops.conv` (1 x 1 kernels as dots, the written-out backward) and, in the row marked `lax`, through
`lax.conv_general_dilated` with autodiff's backward, the plain way; the torch column is
`F.conv2d`. The occupancy head's 3 x 3 x 3 convolutions (rows `conv3d`, at their base shapes: 16
height cells of a 200 x 200 BEV) go the same two ways against `F.conv3d`.
"""

import argparse
import dataclasses
import time

import numpy as np

SCA_LEVELS = ((116, 200), (58, 100), (29, 50), (15, 25))


@dataclasses.dataclass(frozen=True)
class MsdaCase:
  name: str
  batch: int
  levels: tuple
  queries: int
  points: int
  heads: int = 8
  head_dim: int = 32


@dataclasses.dataclass(frozen=True)
class DcnCase:
  name: str
  batch: int
  height: int
  width: int
  channels: int


@dataclasses.dataclass(frozen=True)
class ConvCase:
  name: str
  batch: int
  height: int
  width: int
  cin: int
  cout: int
  kernel: int
  lax: bool = False  # lax.conv_general_dilated and autodiff instead of ops.conv
  depth: int = 0  # > 0: a 3-D convolution over [batch, depth, height, width, channels]


def _conv_pair(name, *shape, depth=0):
  return (
    ConvCase(name, *shape, depth=depth),
    ConvCase('lax' + name[len('conv') :], *shape, lax=True, depth=depth),
  )


FULL = (
  MsdaCase('TSA  2x200x200 q40000 L1 P4', 2, ((200, 200),), 40000, 4),
  MsdaCase('SCA  1 cam q40000 L4 P8', 1, SCA_LEVELS, 40000, 8),
  MsdaCase('SCA  1 cam q10000 L4 P8', 1, SCA_LEVELS, 10000, 8),
  DcnCase('DCN  layer3 6x58x100 c256 3x3', 6, 58, 100, 256),
  *_conv_pair('conv 1x1 layer3 6x58x100 1024>256', 6, 58, 100, 1024, 256, 1),
  *_conv_pair('conv 1x1 layer3 6x58x100 256>1024', 6, 58, 100, 256, 1024, 1),
  *_conv_pair('conv 3x3 layer2 6x116x200 c128', 6, 116, 200, 128, 128, 3),
  *_conv_pair('conv 3x3 FPN 6x116x200 c256', 6, 116, 200, 256, 256, 3),
  *_conv_pair('conv3d occ 16x200x200 16>32', 1, 200, 200, 16, 32, 3, depth=16),
  *_conv_pair('conv3d occ 16x200x200 32>32', 1, 200, 200, 32, 32, 3, depth=16),
)
QUICK = (
  MsdaCase('TSA  2x50x50 q2500 L1 P4', 2, ((50, 50),), 2500, 4),
  MsdaCase('SCA  1 cam q2500 L4 P8', 1, ((29, 50), (15, 25), (8, 13), (4, 7)), 2500, 8),
  DcnCase('DCN  2x15x25 c64 3x3', 2, 15, 25, 64),
  *_conv_pair('conv 1x1 2x15x25 128>64', 2, 15, 25, 128, 64, 1),
  *_conv_pair('conv 3x3 2x64x64 c128', 2, 64, 64, 128, 128, 3),
  *_conv_pair('conv3d 16x50x50 2>16', 1, 50, 50, 2, 16, 3, depth=16),
)


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _msda_inputs(case, rng):
  length = sum(h * w for h, w in case.levels)
  lv = len(case.levels)
  value = rng.standard_normal((case.batch, length, case.heads, case.head_dim), np.float32)
  loc = rng.uniform(-0.1, 1.1, (case.batch, case.queries, case.heads, lv, case.points, 2))
  aw = rng.uniform(0, 1, (case.batch, case.queries, case.heads, lv, case.points))
  g = rng.standard_normal((case.batch, case.queries, case.heads * case.head_dim), np.float32)
  return value, loc.astype(np.float32), aw.astype(np.float32), g


def _dcn_inputs(case, rng):
  b, h, w, c = case.batch, case.height, case.width, case.channels
  x = rng.standard_normal((b, h, w, c), np.float32)
  offset = (2 * rng.standard_normal((b, h, w, 18))).astype(np.float32)
  mask = rng.uniform(0, 1, (b, h, w, 9)).astype(np.float32)
  kernel = (rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c)).astype(np.float32)
  g = rng.standard_normal((b, h, w, c), np.float32)
  return x, offset, mask, kernel, g


def _conv_inputs(case, rng):
  lead = (case.batch, case.depth) if case.depth else (case.batch,)
  taps = (case.kernel,) * (3 if case.depth else 2)
  x = rng.standard_normal((*lead, case.height, case.width, case.cin), np.float32)
  kernel = rng.standard_normal((*taps, case.cin, case.cout)) / np.sqrt(np.prod(taps) * case.cin)
  g = rng.standard_normal((*lead, case.height, case.width, case.cout), np.float32)
  return x, kernel.astype(np.float32), g


def _jax_fns(case):
  import jax
  from jax import lax

  from uniscene_jax.ops import conv
  from uniscene_jax.ops.deform_conv import modulated_deform_conv2d
  from uniscene_jax.ops.deformable_attention import ms_deform_attn

  if isinstance(case, MsdaCase):
    op = lambda v, loc, aw: ms_deform_attn(v, case.levels, loc, aw)
  elif isinstance(case, ConvCase):
    conv_fn = lax.conv_general_dilated if case.lax else conv.conv_general_dilated
    dn = ('NDHWC', 'DHWIO', 'NDHWC') if case.depth else ('NHWC', 'HWIO', 'NHWC')
    op = lambda x, k: conv_fn(x, k, (1,) * (len(dn[0]) - 2), 'SAME', dimension_numbers=dn)
  else:
    op = lambda x, off, m, k: modulated_deform_conv2d(x, off, m, k, 1, 1, 1)
  fwd = jax.jit(op)

  @jax.jit
  def fwd_bwd(*args):
    *inputs, g = args
    out, vjp = jax.vjp(op, *inputs)
    return out, vjp(g)

  return fwd, fwd_bwd


def _torch_fns(case):
  import torch

  from tests.reference import ops_torch

  if isinstance(case, MsdaCase):
    op = lambda v, loc, aw: ops_torch.ms_deform_attn(v, case.levels, loc, aw)
    layouts = (None, None, None, None)
  elif isinstance(case, ConvCase) and case.depth:
    op = lambda x, k: torch.nn.functional.conv3d(x, k, padding=case.kernel // 2)
    layouts = ((0, 4, 1, 2, 3), (4, 3, 0, 1, 2), (0, 4, 1, 2, 3))
  elif isinstance(case, ConvCase):
    op = lambda x, k: torch.nn.functional.conv2d(x, k, padding=case.kernel // 2)
    layouts = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  else:
    op = lambda x, off, m, k: ops_torch.modulated_deform_conv2d(x, off, m, k, 1, 1, 1)
    # NHWC -> NCHW for maps, HWIO -> OIHW for the kernel.
    layouts = ((0, 3, 1, 2), (0, 3, 1, 2), (0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

  def to_torch(arrays, grad):
    out = []
    for a, perm in zip(arrays, layouts, strict=False):
      t = torch.from_numpy(np.ascontiguousarray(a.transpose(perm) if perm else a))
      out.append(t.requires_grad_(grad))
    return out

  def fwd(arrays):
    with torch.no_grad():
      return op(*to_torch(arrays, False))

  def fwd_bwd(arrays, g):
    inputs = to_torch(arrays, True)
    out = op(*inputs)
    out.backward(
      torch.from_numpy(np.ascontiguousarray(g.transpose(layouts[-1]) if layouts[-1] else g))
    )
    return [t.grad for t in inputs]

  return fwd, fwd_bwd


def run_case(case, repeats, rng):
  import jax

  if isinstance(case, MsdaCase):
    *arrays, g = _msda_inputs(case, rng)
  elif isinstance(case, ConvCase):
    *arrays, g = _conv_inputs(case, rng)
  else:
    *arrays, g = _dcn_inputs(case, rng)
  j_fwd, j_fwd_bwd = _jax_fns(case)
  j_args = [jax.device_put(a) for a in arrays]
  j_g = jax.device_put(g)
  jax.block_until_ready(j_fwd(*j_args))  # compile
  jax.block_until_ready(j_fwd_bwd(*j_args, j_g))
  t_fwd, t_fwd_bwd = _torch_fns(case)
  t_fwd(arrays)  # warm-up
  t_fwd_bwd(arrays, g)
  jf = _median_time(lambda: jax.block_until_ready(j_fwd(*j_args)), repeats)
  tf = _median_time(lambda: t_fwd(arrays), repeats)
  jb = _median_time(lambda: jax.block_until_ready(j_fwd_bwd(*j_args, j_g)), repeats)
  tb = _median_time(lambda: t_fwd_bwd(arrays, g), repeats)
  return jf, jb, tf, tb


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true', help='small shapes, a smoke run')
  p.add_argument('--repeats', type=int, default=3, help='timed runs per measurement (median)')
  p.add_argument('--only', nargs='*', help='run only cases whose name contains one of these')
  args = p.parse_args(argv)
  import jax
  import torch

  cases = QUICK if args.quick else FULL
  if args.only:
    cases = [c for c in cases if any(s in c.name for s in args.only)]
  rng = np.random.default_rng(0)
  print(
    f'jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} '
    f'({torch.get_num_threads()} threads); medians of {args.repeats}, seconds'
  )
  header = (
    f'{"shape":36s} {"jax fwd":>8s} {"torch fwd":>9s} {"ratio":>6s} '
    f'{"jax f+b":>8s} {"torch f+b":>9s} {"ratio":>6s}'
  )
  print(header)
  print('-' * len(header))
  for case in cases:
    jf, jb, tf, tb = run_case(case, args.repeats, rng)
    print(
      f'{case.name:36s} {jf:8.3f} {tf:9.3f} {jf / tf:6.2f} {jb:8.3f} {tb:9.3f} {jb / tb:6.2f}',
      flush=True,
    )


if __name__ == '__main__':
  main()
