"""MRC maps and particle stacks.

* Maps (`.mrc`): `read_map` → (N, N, N) float32 indexed ``vol[z, y, x]`` plus the voxel size in Å
  (None when the header says 0, as in the shipped ribosome map); `write_map` writes atomically.
* Stacks (`.mrcs`): every `.mrcs` is a stack of shape (n, L, L), whatever the header's space group
  says (some writers mark 2D stacks as volumes, see shared/data/README.md). `open_stack` returns a
  read-only ``np.memmap`` after checking the file is as long as the header promises.
* `StackWriter` streams chunks into a preallocated file under a temporary name and renames it on a
  clean exit, so 10⁵ particles never sit in RAM and a killed run leaves no half-written stack.
* `ImageReader` reads RELION image names (``index@stack``, 1-based) in chunks, grouped by stack,
  memory-mapped, with at most a few stacks open at once.
* Both unmap the pages they touched after every chunk (madvise DONTNEED): the data stays in the
  page cache, but a pass over a 6 GB stack keeps one chunk resident, not 6 GB.

Files from other programs are opened with ``permissive=True``; problems become one-line
`DeepAlignError`s naming the file.
"""

from __future__ import annotations

import contextlib
import mmap
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import mrcfile
import mrcfile.utils
import numpy as np

from ..errors import DeepAlignError
from .atomic import atomic_write

MRC_HEADER_BYTES = 1024
MAX_OPEN_STACKS = 8
DEFAULT_BYTES_PER_IMAGE_FACTOR = 8.0
"""Working memory per image as a multiple of one float32 image: the image itself, its complex
FFT (2×) and a few same-sized temporaries in the caller's pipeline."""


def _drop_mapped_pages(array: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped array from this process once a chunk is copied in or out.

    The pages stay in the kernel's page cache (a re-read is a minor fault; written pages are flushed
    first by the caller), but they no longer count as this process's resident memory, which would
    otherwise grow to the size of every stack read or written."""
    raw = getattr(array, "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
        raw.madvise(mmap.MADV_DONTNEED)


def _read_header(path: Path):
    """Header of an MRC file (no data read). Errors: missing, unreadable, not MRC."""
    if not path.exists():
        raise DeepAlignError(f"{path}: file not found")
    if not path.is_file():
        raise DeepAlignError(f"{path}: not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
                header = m.header.copy()
                ext_bytes = int(m.header.nsymbt)
    except (ValueError, OSError, EOFError) as e:
        raise DeepAlignError(f"{path}: not a readable MRC file ({str(e).splitlines()[0]})")
    if header is None or int(header.nx) <= 0 or int(header.ny) <= 0 or int(header.nz) <= 0:
        raise DeepAlignError(f"{path}: not a valid MRC file (bad or missing header)")
    return header, ext_bytes


def _data_layout(path: Path):
    """(dtype, (nz, ny, nx), data offset) from the header, checked against the file length."""
    header, ext_bytes = _read_header(path)
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except ValueError:
        raise DeepAlignError(f"{path}: not a valid MRC file (unsupported mode {int(header.mode)})")
    shape = (int(header.nz), int(header.ny), int(header.nx))
    offset = MRC_HEADER_BYTES + ext_bytes
    need = offset + int(np.prod(shape)) * dtype.itemsize
    have = path.stat().st_size
    if have < need:
        raise DeepAlignError(
            f"{path}: truncated file ({have} bytes, the header's {shape[0]}×{shape[1]}×{shape[2]} "
            f"mode-{int(header.mode)} data needs {need})"
        )
    return header, dtype, shape, offset


def _voxel_size(header) -> float | None:
    """Voxel size (Å) along x from cella / mx; None when unset (0)."""
    mx = int(header.mx)
    cella_x = float(header.cella.x)
    if mx <= 0 or not np.isfinite(cella_x) or cella_x <= 0:
        return None
    return cella_x / mx


def read_map(path: Path | str) -> tuple[np.ndarray, float | None]:
    """Read a cubic 3D map.

    Returns (vol, voxel_size_ang): vol (N, N, N) float32 indexed [z, y, x] (axes reordered when
    the header's mapc/mapr/maps are not 1/2/3); voxel_size_ang None when the header says 0.
    """
    path = Path(path)
    header, dtype, shape, offset = _data_layout(path)
    if shape[0] == 1:
        raise DeepAlignError(f"{path}: a 2D image ({shape[2]}×{shape[1]}), expected a 3D map")
    data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    axes = [int(header.maps), int(header.mapr), int(header.mapc)]  # data axis i holds MRC axis axes[i]
    if sorted(axes) == [1, 2, 3] and axes != [3, 2, 1]:
        data = np.transpose(data, [axes.index(3), axes.index(2), axes.index(1)])
    if not (data.shape[0] == data.shape[1] == data.shape[2]):
        raise DeepAlignError(f"{path}: map is {data.shape[2]}×{data.shape[1]}×{data.shape[0]}, expected a cube")
    vol = np.array(data, dtype=np.float32)
    del data
    if not np.all(np.isfinite(vol)):
        raise DeepAlignError(f"{path}: map contains NaN or infinite values")
    return vol, _voxel_size(header)


def read_image(path: Path | str) -> tuple[np.ndarray, float | None]:
    """Read one 2D image (a micrograph): an MRC file with a single section.

    Returns (image (ny, nx) float32 indexed [y, x], pixel size in Å or None when the header says 0)."""
    path = Path(path)
    header, dtype, shape, offset = _data_layout(path)
    if shape[0] != 1:
        raise DeepAlignError(f"{path}: {shape[0]} sections ({shape[2]}×{shape[1]}×{shape[0]}), expected one 2D micrograph")
    data = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    image = np.array(data[0], dtype=np.float32)
    del data
    if not np.all(np.isfinite(image)):
        raise DeepAlignError(f"{path}: image contains NaN or infinite values")
    return image, _voxel_size(header)


def write_map(path: Path | str, vol: np.ndarray, voxel_size_ang: float | None) -> None:
    """Write a 3D map (N, N, N) [z, y, x] as float32 MRC2014, atomically; voxel size in Å (None → 0)."""
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"write_map expects a 3D array, got shape {vol.shape}")
    with atomic_write(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(vol)
            m.set_volume()
            m.voxel_size = float(voxel_size_ang or 0.0)


def open_stack(path: Path | str) -> np.memmap:
    """Read-only memory map (n, L, L) of an image stack (any `.mrc`/`.mrcs`; a single 2D image is n=1).

    The header's nz is the number of images even when the space group says "volume".
    """
    path = Path(path)
    _, dtype, shape, offset = _data_layout(path)
    if shape[1] != shape[2]:
        raise DeepAlignError(f"{path}: images are {shape[2]}×{shape[1]}, expected square images")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def stack_info(path: Path | str) -> tuple[int, int, float | None]:
    """(n_images, box, pixel_size_ang or None) from the header only (file length checked)."""
    path = Path(path)
    header, _, shape, _ = _data_layout(path)
    if shape[1] != shape[2]:
        raise DeepAlignError(f"{path}: images are {shape[2]}×{shape[1]}, expected square images")
    return shape[0], shape[1], _voxel_size(header)


def write_stack(path: Path | str, images: np.ndarray, pixel_size_ang: float | None) -> None:
    """Write images (n, L, L) as a float32 MRC image stack, atomically."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"write_stack expects (n, L, L) images, got shape {images.shape}")
    with atomic_write(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(images)
            m.set_image_stack()
            m.voxel_size = float(pixel_size_ang or 0.0)


class StackWriter:
    """Stream (n, box, box) float32 images into a new stack without holding them in RAM.

        with StackWriter(out, n, box, pixel_size_ang) as w:
            for start, chunk in ...:
                w.write(start, chunk)        # or w.append(chunk)

    The file is preallocated with `mrcfile.new_mmap` under a temporary name in the same folder and
    renamed onto `path` when the block exits cleanly with every image written; on an exception (or
    missing images) the temporary file is removed and `path` is untouched. Header statistics are
    accumulated chunk by chunk.
    """

    def __init__(self, path: Path | str, n: int, box: int, pixel_size_ang: float | None):
        if n <= 0 or box <= 0:
            raise ValueError(f"StackWriter needs n > 0 and box > 0, got n={n}, box={box}")
        self.path = Path(path)
        self.n, self.box = int(n), int(box)
        self.pixel_size_ang = pixel_size_ang
        self._stack = contextlib.ExitStack()
        self._mrc = None
        self._written = None
        self._cursor = 0
        self._min, self._max = np.inf, -np.inf
        self._sum = 0.0
        self._sumsq = 0.0

    def __enter__(self) -> "StackWriter":
        tmp = self._stack.enter_context(atomic_write(self.path))
        try:
            self._mrc = mrcfile.new_mmap(tmp, shape=(self.n, self.box, self.box), mrc_mode=2, overwrite=True)
        except OSError as e:
            self._stack.close()
            raise DeepAlignError(f"{self.path}: cannot create stack ({e.strerror})")
        self._written = np.zeros(self.n, dtype=bool)
        return self

    def write(self, start: int, images: np.ndarray) -> None:
        """Write images (k, box, box) at positions start … start+k-1 (0-based)."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 2:
            images = images[None]
        k = images.shape[0]
        if images.shape[1:] != (self.box, self.box):
            raise ValueError(f"StackWriter: images {images.shape[1:]} do not match box {self.box}")
        if start < 0 or start + k > self.n:
            raise ValueError(f"StackWriter: images {start}..{start + k - 1} outside the stack of {self.n}")
        if k == 0:
            return
        self._mrc.data[start : start + k] = images
        self._mrc.data.flush()
        _drop_mapped_pages(self._mrc.data)
        self._written[start : start + k] = True
        self._min = min(self._min, float(images.min()))
        self._max = max(self._max, float(images.max()))
        as64 = images.astype(np.float64)
        self._sum += float(as64.sum())
        self._sumsq += float(np.square(as64).sum())
        self._cursor = max(self._cursor, start + k)

    def append(self, images: np.ndarray) -> None:
        """Write images right after the last written position."""
        self.write(self._cursor, images)

    def _finish_header(self) -> None:
        missing = int((~self._written).sum())
        if missing:
            raise DeepAlignError(f"{self.path}: only {self.n - missing} of {self.n} images were written")
        count = self.n * self.box * self.box
        mean = self._sum / count
        m = self._mrc
        m.set_image_stack()
        m.voxel_size = float(self.pixel_size_ang or 0.0)
        m.header.dmin, m.header.dmax, m.header.dmean = self._min, self._max, mean
        m.header.rms = float(np.sqrt(max(self._sumsq / count - mean * mean, 0.0)))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self._finish_header()
            except BaseException as e:
                self._mrc.close()
                self._stack.__exit__(type(e), e, e.__traceback__)
                raise
        self._mrc.close()  # flush before the rename
        return bool(self._stack.__exit__(exc_type, exc, tb))


def parse_image_name(name: str) -> tuple[int, str]:
    """RELION ``'12@stack.mrcs'`` → (12, 'stack.mrcs'); a bare file name is image 1 of that file."""
    name = str(name).strip()
    if "@" in name:
        idx, stack = name.split("@", 1)
        try:
            index = int(idx)
        except ValueError:
            raise DeepAlignError(f"{name}: image name is not 'index@stack'")
        if index < 1:
            raise DeepAlignError(f"{name}: image index must be 1-based (≥ 1)")
        return index, stack
    return 1, name


def chunk_size_for_budget(box: int, budget_bytes: float, bytes_per_image_factor: float = DEFAULT_BYTES_PER_IMAGE_FACTOR) -> int:
    """Number of (box, box) images whose working set fits budget_bytes (at least 1)."""
    per_image = float(box) * float(box) * np.dtype(np.float32).itemsize * float(bytes_per_image_factor)
    return max(1, int(budget_bytes // per_image))


class ImageReader:
    """Random and chunked access to the images named in a particle table.

    image_names: RELION names ``'index@stack'`` (1-based index); relative stack paths are resolved
    against base_dir. Construction reads every stack's header once and checks that each stack
    exists, holds the requested indices and that all images have one box size.
    """

    def __init__(self, image_names: Sequence[str], base_dir: Path | str = ".", max_open: int = MAX_OPEN_STACKS):
        self.base_dir = Path(base_dir)
        self.max_open = max(1, int(max_open))
        n = len(image_names)
        if n == 0:
            raise DeepAlignError(f"{self.base_dir}: the particle table lists no images")
        stack_ids = np.empty(n, dtype=np.int64)
        local = np.empty(n, dtype=np.int64)
        self.stacks: list[Path] = []
        self._labels: list[str] = []
        lookup: dict[str, int] = {}
        for i, name in enumerate(image_names):
            index, stack = parse_image_name(name)
            sid = lookup.get(stack)
            if sid is None:
                sid = lookup[stack] = len(self.stacks)
                p = Path(stack)
                self.stacks.append(p if p.is_absolute() else self.base_dir / p)
                self._labels.append(stack)
            stack_ids[i] = sid
            local[i] = index - 1
        self._stack_ids, self._local = stack_ids, local
        self._sizes = np.zeros(len(self.stacks), dtype=np.int64)
        box = None
        box_from = None
        for sid, path in enumerate(self.stacks):
            if not path.exists():
                raise DeepAlignError(f"{path}: stack not found (image names like '1@{self._labels[sid]}' are read relative to {self.base_dir})")
            count, b, _ = stack_info(path)
            if box is None:
                box, box_from = b, path
            elif b != box:
                raise DeepAlignError(f"{path}: box {b} differs from box {box} of {box_from.name}; all particles need one box size")
            self._sizes[sid] = count
            wanted = int(local[stack_ids == sid].max()) + 1
            if wanted > count:
                raise DeepAlignError(f"{path.name}: image {wanted} requested but the stack has {count}")
        self.box: int = int(box)
        self._open: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return len(self._stack_ids)

    def _stack(self, sid: int) -> np.memmap:
        mm = self._open.get(sid)
        if mm is not None:
            self._open.move_to_end(sid)
            return mm
        mm = open_stack(self.stacks[sid])
        self._open[sid] = mm
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return mm

    def read(self, indices) -> np.ndarray:
        """Images (k, L, L) float32 for particle positions `indices` (0-based rows of the table)."""
        idx = np.arange(len(self))[indices] if isinstance(indices, slice) else np.asarray(indices, dtype=np.int64).ravel()
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"ImageReader: index out of range for {len(self)} images")
        idx = idx % len(self) if idx.size else idx
        out = np.empty((idx.size, self.box, self.box), dtype=np.float32)
        sids = self._stack_ids[idx]
        for sid in np.unique(sids):
            rows = np.nonzero(sids == sid)[0]
            loc = self._local[idx[rows]]
            order = np.argsort(loc, kind="stable")
            mm = self._stack(int(sid))
            out[rows[order]] = mm[loc[order]]
            _drop_mapped_pages(mm)
        return out

    def iter_chunks(self, chunk_size: int) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield (slice of table rows, images (k, L, L) float32) in table order."""
        chunk_size = max(1, int(chunk_size))
        for start in range(0, len(self), chunk_size):
            sl = slice(start, min(start + chunk_size, len(self)))
            yield sl, self.read(sl)

    def close(self) -> None:
        self._open.clear()

    def __enter__(self) -> "ImageReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

