"""Shared plumbing for our InMemoryDatasets: one cache folder per configuration, safe atomic writes.

Every dataset processes *both* splits in one go (the test split is normalised with train
statistics) into ``root/processed/<name>-<key>/{train,test}.pt``. ``key`` hashes the dataset's
configuration, the ``pre_transform``/``pre_filter`` and, for generated datasets, the source code of
the generator modules, so a changed argument or generator never reads a stale cache.

The cache files are checksummed and loaded without unpickling code (``torch_geometric_bsa.io``):
PyG's own ``InMemoryDataset.load`` and its ``pre_transform.pt`` check may fall back to a full
unpickle, so both are replaced here. A corrupt cache is rebuilt, with a warning naming it.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import os.path as osp
import re
import sys
import warnings
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch_geometric.data import Data, InMemoryDataset

from ..io import CorruptFileError, atomic_write, load_checked, remove_stale_temps, save_checked

SPLITS = ("train", "test")


def _strip_address(obj) -> str:
    # Same normalisation as PyG: reprs of functions/lambdas carry a memory address.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def cache_key(config: Dict, sources: Sequence[ModuleType] = (), extra: Sequence[object] = ()) -> str:
    """12-hex-digit hash of a JSON-able ``config``, the source text of ``sources`` and the reprs of
    ``extra`` objects (transforms)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for mod in sources:
        try:
            text = inspect.getsource(mod)
        except (OSError, TypeError):  # no source shipped (frozen / .pyc-only install)
            text = mod.__name__
        h.update(text.encode())
    for obj in extra:
        h.update(_strip_address(obj).encode())
    return h.hexdigest()[:12]


class CachedSplitDataset(InMemoryDataset):
    """InMemoryDataset with a ``split`` argument and a per-configuration cache folder.

    Subclasses set ``cache_name``, implement ``cache_config`` (JSON-able dict of everything
    that changes the processed data) and ``build`` (returns ``{"train": [...], "test": [...]}``
    lists of ``Data``), and may list ``cache_sources``: modules whose
    source code is part of the key besides this one and the subclass's own module.
    """

    cache_name: str = "dataset"
    cache_sources: Sequence[ModuleType] = ()

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable] = None,
                 pre_transform: Optional[Callable] = None, pre_filter: Optional[Callable] = None,
                 log: bool = True, force_reload: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self._key: Optional[str] = None
        super().__init__(root, transform, pre_transform, pre_filter, log=log,
                         force_reload=force_reload)
        path = self.processed_paths[SPLITS.index(split)]
        try:
            self.load(path)
        except CorruptFileError as e:  # a cache can always be rebuilt from its sources
            warnings.warn(f"{e}; rebuilding the cache {self.processed_dir}", stacklevel=2)
            self._build_cache()
            self.load(path)

    # -- configuration -----------------------------------------------------------------------
    def cache_config(self) -> Dict:
        raise NotImplementedError

    def build(self) -> Dict[str, List[Data]]:
        raise NotImplementedError

    @property
    def key(self) -> str:
        if self._key is None:
            sources = [sys.modules[__name__], sys.modules[type(self).__module__],
                       *self.cache_sources]
            self._key = cache_key(self.cache_config(), sources,
                                  (self.pre_transform, self.pre_filter))
        return self._key

    # -- PyG hooks ------------------------------------------------------------------------------
    @property
    def processed_dir(self) -> str:
        return osp.join(self.root, "processed", f"{self.cache_name}-{self.key}")

    @property
    def processed_file_names(self) -> List[str]:
        return [f"{s}.pt" for s in SPLITS]

    @property
    def raw_file_names(self) -> List[str]:
        return []

    def download(self) -> None:
        pass

    def _process(self) -> None:
        # Replaces PyG's: it reads pre_transform.pt/pre_filter.pt with a full unpickle. Our cache
        # key already covers pre_transform/pre_filter, so those files are neither read nor written.
        if not self.force_reload and all(osp.isfile(p) for p in self.processed_paths):
            return
        self._build_cache()

    def _build_cache(self) -> None:
        os.makedirs(self.processed_dir, exist_ok=True)
        remove_stale_temps(self.processed_dir)  # leftovers of a generator that was killed mid-write
        if self.log and "PYTEST_CURRENT_TEST" not in os.environ:
            print(f"Processing {self.processed_dir} ...", file=sys.stderr)
        self.process()

    @classmethod
    def save(cls, data_list: Sequence[Data], path: str) -> None:
        r"""Collates ``data_list`` and writes it as a checksummed file (``torch_geometric_bsa.io``)."""
        data, slices = cls.collate(data_list)
        save_checked(path, {"data": data.to_dict(), "slices": slices})

    def load(self, path: str, data_cls=Data) -> None:
        r"""Reads a file written by :meth:`save`: checksum verified, nothing unpickled beyond tensors
        and plain containers (raises ``CorruptFileError`` / ``UnsafeFileError`` naming ``path``)."""
        out = load_checked(path)
        if not (isinstance(out, dict) and isinstance(out.get("data"), dict) and "slices" in out):
            raise CorruptFileError(f"{path}: not a dataset cache (unexpected content)")
        self.data, self.slices = data_cls.from_dict(out["data"]), out["slices"]

    def process(self) -> None:
        with single_threaded():
            lists = self.build()
        for split, path in zip(SPLITS, self.processed_paths):
            data_list = lists[split]
            if self.pre_filter is not None:
                data_list = [d for d in data_list if self.pre_filter(d)]
            if self.pre_transform is not None:
                data_list = [self.pre_transform(d) for d in data_list]
            self.save(data_list, path)  # atomic and checksummed

        def write_config(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(self.cache_config(), f, indent=2, sort_keys=True, default=str)
        atomic_write(osp.join(self.processed_dir, "config.json"), write_config)

    # -- convenience ------------------------------------------------------------------------------
    @property
    def y_mean(self) -> float:
        """Mean used to normalise ``y`` (``y_raw = y * y_std + y_mean``)."""
        return float(self._data.y_mean[0])

    @property
    def y_std(self) -> float:
        """Standard deviation used to normalise ``y``."""
        return float(self._data.y_std[0])

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({len(self)}, split={self.split!r})"


@contextlib.contextmanager
def single_threaded():
    """Run torch on one thread while generating data.

    Results then do not depend on the machine's thread count (reduction order), and the many
    mid-sized elementwise ops of the generators run several times faster single-threaded when
    other processes share the cores (measured: 0.6 s vs 7 s per car on a loaded 2-core box).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def attach_stats(data_list: List[Data], mean: float, std: float) -> None:
    """Normalise ``y`` in place and record the statistics on every sample (shape ``[1]`` so they
    collate to ``[num_graphs]``).

    A (numerically) constant target, ``std`` 0, NaN or below ``1e-12 * max(1, |mean|)``, is only
    centred: ``std`` is set to 1 with a warning, so ``y`` becomes 0 instead of NaN and
    ``y * y_std + y_mean`` still recovers it."""
    if not (math.isfinite(std) and std > 1e-12 * max(1.0, abs(mean))):
        warnings.warn(f"the regression target is constant (std {std:g} around mean {mean:g}): it is "
                      "centred but not scaled (y_std = 1)", stacklevel=2)
        std = 1.0
    for d in data_list:
        d.y = (d.y - mean) / std
        d.y_mean = torch.tensor([mean], dtype=torch.float32)
        d.y_std = torch.tensor([std], dtype=torch.float32)
