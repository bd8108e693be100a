from recbole_mm.quick_start.quick_start import load_data_and_model, run, run_recbole, run_recboles
from recbole_mm.utils import build_data_and_model

__all__ = ["run", "run_recbole", "run_recboles", "load_data_and_model", "build_data_and_model"]
