"""The dataset store (:mod:`appliance.datasets.store`): training and golden sets, content-addressed,
inside the perimeter, named from models' manifests."""

from appliance.datasets.store import DatasetInfo, DatasetRef, DatasetStore, StoredDataset

__all__ = ["DatasetInfo", "DatasetRef", "DatasetStore", "StoredDataset"]
