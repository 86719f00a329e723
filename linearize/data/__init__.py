"""Training text: sources (Hub datasets, local files, the offline corpus), chat formatting and packing."""

from .packing import BatchPlan, PackedData, pack_documents
from .sources import load_documents

__all__ = ["BatchPlan", "PackedData", "load_documents", "pack_documents"]
