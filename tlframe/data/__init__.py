"""tlframe data layer: domains (where images come from) and the transfer data module.

A :class:`Domain` yields ``(PIL image, label)`` datasets for its ``"train"`` and
``"test"`` splits; :class:`TransferDataModule` pairs a source and a target domain, applies
the backbone's transforms and serves Lightning dataloaders.
"""

from tlframe.data.datamodule import TransferDataModule
from tlframe.data.digits import MNISTDomain, MNISTMDomain, SVHNDomain, USPSDomain
from tlframe.data.domainbed import RotatedMNISTDomain
from tlframe.data.multidomain import MultiDomainDataModule
from tlframe.data.domains import Domain, ImageFilesDomain, ImageFolderDomain, ImageListDomain, RelabelledDomain
from tlframe.data.errors import DataError
from tlframe.data.paths import resolve_data_root
from tlframe.data.synthetic import SyntheticDomain

__all__ = [
    "DataError",
    "Domain",
    "ImageFilesDomain",
    "ImageFolderDomain",
    "ImageListDomain",
    "MNISTDomain",
    "MNISTMDomain",
    "MultiDomainDataModule",
    "RelabelledDomain",
    "RotatedMNISTDomain",
    "SVHNDomain",
    "SyntheticDomain",
    "TransferDataModule",
    "USPSDomain",
    "resolve_data_root",
]
