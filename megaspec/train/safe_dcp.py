"""Reading torch.distributed.checkpoint (DCP) directories without unpickling arbitrary objects.

DCP stores its index (`.metadata`) as a pickle and loads non-tensor state (the
optimizer's hyper-parameters) with `torch.load(weights_only=False)`: a training
checkpoint from someone else could run code on `trainer.resume`. Here the index is
read by an unpickler that can only build DCP's own metadata classes, torch sizes,
dtypes and layouts, every file it names must be a plain file name inside the
checkpoint directory, and non-tensor state is loaded with `weights_only=True`.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megaspec.errors import SpecError

# What a DCP index is built from: its dataclasses and enums, sizes, layouts and paths; nothing that acts.
_ALLOWED = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "Path")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata only: any other class or function in the pickle is an error."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the checkpoint's index names {module}.{name}, which a DCP index never holds")


class SafeReader(FileSystemReader):
    """A FileSystemReader whose index cannot run code or point outside the checkpoint directory."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The index, unpickled with DCP's metadata classes only."""
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
            raise SpecError(f"{path}: not a readable checkpoint index: {exc}") from None
        if not isinstance(metadata, Metadata):
            raise SpecError(f"{path}: not a checkpoint index (it holds {type(metadata).__name__})")
        for info in (metadata.storage_data or {}).values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise SpecError(f"{path}: names the file {name!r}, which is not a plain file name inside "
                                "the checkpoint directory")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, loading non-tensor state with weights_only=True."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        """Plain values (numbers, strings, tuples) only: nothing else is unpickled."""
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
