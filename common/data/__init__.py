"""Data for CareFed sites: sources (embedded MNIST, MedMNIST .npz), partitions, scanner shifts, site splits."""

from common.data.site import SiteData, load_site_data
from common.data.sources import DataSource, ImageSet, load_source

__all__ = ["DataSource", "ImageSet", "SiteData", "load_site_data", "load_source"]
