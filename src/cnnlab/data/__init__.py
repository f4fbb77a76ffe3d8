"""Datasets: the IDX and CIFAR binary formats, the registry of named datasets, finding/downloading and loading them."""
from cnnlab.data.cifar import CifarError
from cnnlab.data.idx import IDXError, read_idx, write_idx
from cnnlab.data.loading import DataError, Dataset, Splits, load_dataset, split_train_val
from cnnlab.data.registry import DATASETS, DataFile, DatasetSpec, UnknownDataset, get_dataset
from cnnlab.data.store import ChecksumMismatch, DatasetUnavailable, Location, fetch, locate, search_places, verify

__all__ = ["CifarError", "IDXError", "read_idx", "write_idx", "DataError", "Dataset", "Splits", "load_dataset",
           "split_train_val", "DATASETS", "DataFile", "DatasetSpec", "UnknownDataset", "get_dataset",
           "ChecksumMismatch", "DatasetUnavailable", "Location", "fetch", "locate", "search_places", "verify"]
