"""The data of a triplet run: which source, how it is split, and its P x K sampler.

``DataConfig`` describes the samples (``spatial_rank`` 2 = images
``[H, W, C]`` from any source; 1 = EKG-like signals ``[T, C]`` or 3 = CT-like
volumes ``[D, H, W, C]``, synthetic only) and checks its own settings when
built. :func:`prepare_data` loads the source, leaves out small identities
(``drop_small``), splits identities into train and held-out, appends
``extra_synthetic`` procedural identities to the training side and checks that
P x K batches can be drawn, all before any compute.

Importing this module loads neither JAX nor PIL; the sources are imported when
built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxface import paths
from jaxface.config_dict import JsonConfig, field, invalid
from jaxface.data import source as source_lib

DATA_KINDS = ("synthetic", "folder", "tfds")
SPATIAL_RANKS = {1: "signals T", 2: "images H,W", 3: "volumes D,H,W"}
ON_BAD_IMAGE = ("warn", "raise")  # ImageFolderSource(on_error=...)


def int_tuple(value) -> tuple[int, ...]:
  """A tuple of ints from a tuple, a JSON list or a flag's "64,64" string."""
  if isinstance(value, str):
    value = [t for t in value.split(",") if t.strip()]
  return tuple(int(t) for t in value)


@dataclasses.dataclass(frozen=True)
class DataConfig(JsonConfig):
  """Where the samples come from, their shape, the held-out split and the P x K batch."""
  kind: str = field("synthetic", "synthetic | folder | tfds", flag="data")
  spatial_rank: int = field(2, "2: images; 1: signals [T,C], 3: volumes [D,H,W,C] (synthetic)")
  data_path: str = field("", "folder: <root>/<identity>/<images>; $JAXFACE_DATA expands")
  tfds_name: str = field("lfw", "tfds: dataset name")
  tfds_split: str = field("train", "tfds: split")
  tfds_data_dir: str = field("", "tfds: data directory ('' = TFDS's default)")
  synthetic_identities: int = field(96, "synthetic: identities")
  synthetic_images: int = field(12, "images per synthetic identity")
  extra_synthetic: int = field(0, "> 0: append this many synthetic identities to the training side")
  image_size: tuple[int, ...] = field((64, 64), "H,W images are resized to when loaded (rank 1: T, 3: D,H,W)")
  crop_size: tuple[int, ...] = field((56, 56), "H,W random (train) / centre (eval) crop (rank 1: T, 3: D,H,W)")
  channels: int = field(3, "images: 1 or 3; signals: leads, volumes: modalities (1..12)")
  num_holdout: int = field(24, "identities held out for evaluation (last by natural sort)")
  holdout_seed: int = field(-1, ">= 0: choose held-out identities at random with this seed")
  on_bad_image: str = field("warn", "warn (skip and name the file) | raise")
  drop_small: bool = field(False, "leave out identities with fewer than K images (LFW-style folders)")
  align: str = field("none", "folder: none | dlib (aligned chips: pretrained detector + landmarks)")
  align_padding: float = field(0.25, "align=dlib: chip padding (0.25 = eyebrows to chin)")
  P: int = field(16, "identities per batch")
  K: int = field(4, "images per identity")

  def __post_init__(self):
    # Tuples may arrive as lists (from JSON) or strings (from flags).
    for name in ("image_size", "crop_size"):
      object.__setattr__(self, name, int_tuple(getattr(self, name)))
    self._check()

  def _check(self) -> None:
    from jaxface.data.align import ALIGN_METHODS  # the aligner owns its methods
    def bad(name, why):
      raise invalid(name, getattr(self, name), why)
    if self.kind not in DATA_KINDS:
      bad("kind", f"must be one of {', '.join(DATA_KINDS)}")
    if self.kind == "folder" and not self.data_path:
      bad("data_path", "a folder source needs its root, <root>/<identity>/<images>")
    if self.on_bad_image not in ON_BAD_IMAGE:
      bad("on_bad_image", f"must be {' or '.join(ON_BAD_IMAGE)}")
    if self.align not in ALIGN_METHODS:
      bad("align", f"must be {' or '.join(ALIGN_METHODS)}")
    if self.align != "none" and self.kind != "folder":
      bad("align", "needs a folder source (kind='folder')")
    if not 0.0 <= self.align_padding <= 2.0:
      bad("align_padding", "must be in [0, 2]")
    rank = self.spatial_rank
    if rank not in SPATIAL_RANKS:
      bad("spatial_rank", "must be 1 (signals), 2 (images) or 3 (volumes)")
    if rank != 2 and self.kind != "synthetic":
      bad("kind", f"spatial_rank={rank} data comes from synthetic sources only "
                  "(folder and tfds hold 2-D images)")
    what = SPATIAL_RANKS[rank].split()[1]
    for name in ("image_size", "crop_size"):
      v = getattr(self, name)
      if len(v) != rank or min(v) < 8:
        bad(name, f"must be {what} ({rank} entries for spatial_rank={rank}), each >= 8")
    if rank == 1 and self.image_size[0] < 32:
      bad("image_size", "synthetic signals need T >= 32")
    if any(c > s for c, s in zip(self.crop_size, self.image_size)):
      bad("crop_size", f"must not exceed image_size={self.image_size}")
    if rank == 2 and self.channels not in (1, 3):
      bad("channels", "must be 1 (grayscale) or 3 (RGB)")
    if rank != 2 and not 1 <= self.channels <= 12:
      bad("channels", f"must be 1..12 for {SPATIAL_RANKS[rank].split()[0]}")
    if self.P < 2:
      bad("P", "a batch needs at least 2 identities (negatives)")
    if self.K < 2:
      bad("K", "a batch needs at least 2 images per identity (positives)")
    if self.synthetic_identities < 1:
      bad("synthetic_identities", "must be >= 1")
    if self.synthetic_images < 2:
      bad("synthetic_images", "must be >= 2")
    if self.extra_synthetic < 0:
      bad("extra_synthetic", "must be >= 0 (0: off)")
    if self.extra_synthetic and (self.kind == "synthetic" or rank != 2):
      bad("extra_synthetic", "adds synthetic faces to real 2-D image data (kind='folder' or 'tfds')")
    if self.num_holdout < 2:
      bad("num_holdout", "evaluation needs at least 2 held-out identities")


def _silent(line: str) -> None:
  del line


def load_source(data: DataConfig, seed: int,
                printer: Callable[[str], None] = _silent) -> source_lib.ImageSource:
  """Builds the configured source: ``[N, H, W, C] uint8`` images with labels.

  With ``data.spatial_rank`` 1 or 3 the samples are synthetic signals
  ``[N, T, C]`` or volumes ``[N, D, H, W, C]``. Synthetic data is drawn from
  ``seed``. ``printer`` hears which images alignment found no face in.
  """
  size = tuple(data.image_size)
  if data.kind == "synthetic" and data.spatial_rank != 2:
    from jaxface.data import synthetic_nd
    if data.spatial_rank == 1:
      return synthetic_nd.synthetic_signals(data.synthetic_identities, data.synthetic_images,
                                            length=size[0], channels=data.channels, seed=seed)
    return synthetic_nd.synthetic_volumes(data.synthetic_identities, data.synthetic_images,
                                          size=size, channels=data.channels, seed=seed)
  if data.spatial_rank != 2:
    raise invalid("spatial_rank", data.spatial_rank, f"needs synthetic data, got kind={data.kind!r}")
  if data.kind == "synthetic":
    from jaxface.data import synthetic
    if size[0] != size[1]:
      raise invalid("image_size", size, "synthetic faces are square")
    return synthetic.synthetic_faces(data.synthetic_identities, data.synthetic_images,
                                     image_size=size[0], channels=data.channels, seed=seed)
  if data.kind == "folder":
    from jaxface.data import folder
    src = folder.ImageFolderSource(paths.expand(data.data_path), image_size=size,
                                   channels=data.channels, on_error=data.on_bad_image,
                                   align=data.align, align_padding=data.align_padding)
    if data.align != "none":
      printer(f"aligned faces (align={data.align}): no face found in {len(src.align_missed)} of "
              f"{len(src)} images (centre crop used)" + "".join(f"\n  {p}" for p in src.align_missed))
    return src
  from jaxface.data import tfds_source
  return tfds_source.TfdsSource(data.tfds_name, split=data.tfds_split,
                                data_dir=paths.expand(data.tfds_data_dir) or None,
                                image_size=size, channels=data.channels)


def drop_small_identities(data: DataConfig, source: source_lib.ImageSource,
                          printer: Callable[[str], None] = _silent) -> source_lib.ImageSource:
  """``data.drop_small``: ``source`` without its identities of fewer than K images.

  Says (through ``printer``) how many identities and images were left out and
  how many remain.

  Raises:
    ValueError: fewer than P training plus ``num_holdout`` held-out identities remain.
  """
  total_ids, total_images = source.num_identities, len(source)
  kept, dropped = source_lib.keep_identities_with(source, data.K)
  printer(f"drop_small: left out {dropped['identities']} of {total_ids} identities "
          f"({dropped['images']} of {total_images} images) with fewer than K={data.K} images; "
          f"{kept.num_identities} identities ({len(kept)} images) remain")
  if kept.num_identities < data.P + data.num_holdout:
    raise invalid(
        "drop_small", True,
        f"only {kept.num_identities} of {total_ids} identities have at least K={data.K} images; "
        f"training needs P={data.P} identities plus num_holdout={data.num_holdout} held out "
        f"({data.P + data.num_holdout}). Lower K, P or num_holdout, or add images")
  return kept


def prepare_data(data: DataConfig, seed: int, source: source_lib.ImageSource | None = None,
                 printer: Callable[[str], None] = _silent):
  """Loads and splits the data and checks it fits P x K before any compute.

  Args:
    data: the data settings.
    seed: the run's seed: synthetic data, the ``extra_synthetic`` identities
      and the sampler's stream depend on it.
    source: already loaded data (the members of an ensemble share the data
      of the ensemble's seed).
    printer: hears what alignment missed and what ``drop_small`` left out.

  Returns:
    (train source, held-out source, sampler over the train source).

  Raises:
    source.SmallIdentitiesError: training identities with fewer than K images
      (without ``drop_small``); its fields let a caller phrase the fix.
    ValueError: any other reason the data does not fit.
  """
  source = load_source(data, seed, printer) if source is None else source
  if data.drop_small:
    source = drop_small_identities(data, source, printer)
  if len(source.identity_names) < 2:
    raise ValueError(f"the data has {len(source.identity_names)} identities; training needs >= 2")
  holdout_seed = data.holdout_seed if data.holdout_seed >= 0 else None
  train_src, holdout_src = source_lib.split_by_identity(source, num_holdout=data.num_holdout,
                                                        seed=holdout_seed)
  if data.extra_synthetic > 0:
    from jaxface.data import mix  # procedural identities appended to the training side only
    train_src = mix.with_synthetic(train_src, data.extra_synthetic, data.synthetic_images, seed=seed)
  try:
    source_lib.validate_pk(train_src, data.P, data.K, drop_small=data.drop_small)
  except source_lib.SmallIdentitiesError as e:
    raise source_lib.SmallIdentitiesError(
        f"K={e.K} is larger than the number of images of {len(e.names)} of {e.num_identities} "
        f"training identities: {e.listing}. Lower K, or set drop_small to leave those "
        f"identities out", K=e.K, names=e.names, counts=e.counts,
        num_identities=e.num_identities, listing=e.listing) from None
  from jaxface.data import sampler as sampler_lib
  sampler = sampler_lib.PKSampler(train_src.labels, data.P, data.K, seed=seed)
  return train_src, holdout_src, sampler
