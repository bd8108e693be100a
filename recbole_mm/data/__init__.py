from recbole_mm.data.dataset import FeatureFileError, MMGeneralDataset, MMSequentialDataset
from recbole_mm.data.locate import DatasetNotFoundError, cache_dir, find_dataset

__all__ = ["MMGeneralDataset", "MMSequentialDataset", "FeatureFileError", "DatasetNotFoundError",
           "find_dataset", "cache_dir"]
