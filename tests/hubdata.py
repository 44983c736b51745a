"""Small local datasets with the schemas of the hub's (FLOWER.md, "Hub layouts"), written
with Hugging Face ``datasets`` the way the hub stores them (PNG-encoded images in
parquet): what a user's local copy looks like, at a size a test can decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl.text import LEAF_VOCABULARY


def png(a: np.ndarray) -> dict:
    """An image as the hub stores it: PNG bytes (datasets' Image feature, undecoded)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> list[dict]:
    return [png(a) for a in rng.integers(0, 256, (n, *shape), dtype=np.uint8)]


def cifar10(folder: Path, train: int = 60, test: int = 20, seed: int = 0,
            classes: int = 10) -> Path:
    """uoft-cs/cifar10's layout: ``img`` (PNG, 32x32 RGB) and ``label``, in
    ``train-00000-of-00001.parquet`` and ``test-00000-of-00001.parquet``."""
    import datasets

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        ds = datasets.Dataset.from_dict({
            "img": _images(rng, n, (32, 32, 3)),
            "label": (np.arange(n) % classes).astype(np.int64).tolist(),
        }).cast_column("img", datasets.Image())
        ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


def femnist(path: Path, writers: int = 4, per_writer: int = 12, seed: int = 0,
            classes: int = 6) -> Path:
    """flwrlabs/femnist's layout: ``image`` (PNG, 28x28 grayscale), ``writer_id``
    (strings), ``hsf_id``, ``character`` (labels); one parquet file, no test split."""
    import datasets

    rng = np.random.default_rng(seed)
    n = writers * per_writer
    ds = datasets.Dataset.from_dict({
        "image": _images(rng, n, (28, 28)),
        "writer_id": [f"f{w:04d}_{w % 90:02d}" for w in range(writers) for _ in range(per_writer)],
        "hsf_id": [w % 8 for w in range(writers) for _ in range(per_writer)],
        "character": (np.arange(n) % classes).astype(np.int64).tolist(),
    }).cast_column("image", datasets.Image())
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))
    return path


def shakespeare_rows(roles: int = 3, per_role: int = 30, seed: int = 0) -> dict[str, list]:
    """flwrlabs/shakespeare's columns: ``x`` (80 characters), ``y`` (the next one),
    ``character_id``; windows of a random text over LEAF's vocabulary, per role."""
    rng = np.random.default_rng(seed)
    xs, ys, ids = [], [], []
    for r in range(roles):
        letters = rng.choice(list(LEAF_VOCABULARY), per_role + 80)
        line = "".join(letters)
        for i in range(per_role):
            xs.append(line[i:i + 80])
            ys.append(line[i + 80])
            ids.append(f"PLAY_{r:02d}_ROLE")
    return {"x": xs, "y": ys, "character_id": ids}


def shakespeare(path: Path, roles: int = 3, per_role: int = 30, seed: int = 0) -> Path:
    """The hub's file is shakespeare.csv; ``.parquet`` in ``path`` writes parquet."""
    import datasets

    ds = datasets.Dataset.from_dict(shakespeare_rows(roles, per_role, seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    (ds.to_parquet if path.suffix == ".parquet" else ds.to_csv)(str(path))
    return path


def image_folder(folder: Path, classes: int = 3, per_class: int = 8, seed: int = 0,
                 size: int = 16) -> Path:
    """FOLDER/CLASS/IMAGE.png (datasets' imagefolder layout), RGB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = folder / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                d / f"{i:03d}.png")
    return folder


def saved_to_disk(folder: Path, train: int = 40, test: int = 12, seed: int = 0,
                  classes: int = 4) -> Path:
    """A DatasetDict (train, test) written by ``save_to_disk``: ``image`` 32x32 RGB,
    ``label`` a ClassLabel."""
    import datasets

    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", train), ("test", test)):
        splits[split] = datasets.Dataset.from_dict({
            "image": _images(rng, n, (32, 32, 3)),
            "label": (np.arange(n) % classes).tolist(),
        }).cast_column("image", datasets.Image()).cast_column(
            "label", datasets.ClassLabel(names=[f"c{i}" for i in range(classes)]))
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder
