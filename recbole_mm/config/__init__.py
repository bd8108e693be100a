from recbole_mm.config.configurator import Config, properties_dir

__all__ = ["Config", "properties_dir"]
