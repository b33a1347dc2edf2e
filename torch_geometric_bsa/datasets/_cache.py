"""Shared plumbing for our InMemoryDatasets: one cache folder per configuration, atomic writes.

Every dataset processes *both* splits in one go (the test split is normalised with train
statistics) into ``root/processed/<name>-<key>/{train,test}.pt``. ``key`` hashes the dataset's
configuration, the ``pre_transform``/``pre_filter`` and, for generated datasets, the source code of
the generator modules, so a changed argument or generator never reads a stale cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import os.path as osp
import re
import sys
import uuid
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch_geometric.data import Data, InMemoryDataset

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


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file,
    and two processes generating the same cache cannot corrupt it."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


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
        self.load(self.processed_paths[SPLITS.index(split)])

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

    def process(self) -> None:
        with single_threaded():
            lists = self.build()
        for split, path in zip(SPLITS, self.processed_paths):
            data_list = lists[split]
            if self.pre_filter is not None:
                data_list = [d for d in data_list if self.pre_filter(d)]
            if self.pre_transform is not None:
                data_list = [self.pre_transform(d) for d in data_list]
            atomic_write(path, lambda tmp, dl=data_list: self.save(dl, tmp))

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
    collate to ``[num_graphs]``)."""
    for d in data_list:
        d.y = (d.y - mean) / std
        d.y_mean = torch.tensor([mean], dtype=torch.float32)
        d.y_std = torch.tensor([std], dtype=torch.float32)
